"""A shard set from a local folder or a URL (http(s)://, s3://, gs://, ... through fsspec).

Everything is learnt from manifest.json. Remote files are fetched once into a local cache,
bounded in size (least recently used files are evicted), and their sha256 is checked against
the manifest before use: a corrupted or tampered shard is refused, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from shards import MANIFEST
from shards.atomic import write_bytes
from shards.manifest import ManifestError, check_format


class ShardSetError(RuntimeError):
    pass


def is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def default_cache_dir() -> Path:
    return Path(os.environ.get("BRATS_SHARDS_CACHE", Path.home() / ".cache" / "brats-shards"))


class ShardSource:
    """Reads files of one shard set by relative path, checked against the manifest."""

    def __init__(self, location: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 cache_bytes: int = 20 * 2**30, storage_options: dict | None = None):
        self.location = str(location).rstrip("/")
        if self.location.startswith("file://"):
            self.location = self.location[7:]
        self.remote = is_url(self.location)
        self.storage_options = storage_options or {}
        self.cache_bytes = cache_bytes
        self._fs, self._fs_pid = None, None
        raw = self._fetch_raw(MANIFEST)
        try:
            self.manifest = check_format(json.loads(raw), f"{self.location}/{MANIFEST}")
        except json.JSONDecodeError as e:
            raise ShardSetError(f"{self.location}/{MANIFEST} is not valid JSON: {e}") from None
        except ManifestError as e:
            raise ShardSetError(str(e)) from None
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        self.files = {f["path"]: f for f in self.manifest["files"]}
        self._wds = {f["patient"]: f["path"] for f in self.manifest["files"] if f["format"] == "wds"}
        if self.remote:
            key = hashlib.sha256(self.location.encode()).hexdigest()[:16]
            self.cache = Path(cache_dir or default_cache_dir()) / key
            self.cache.mkdir(parents=True, exist_ok=True)

    # -- raw access
    def _filesystem(self):
        # one fsspec instance per process: its event loop does not survive a fork (DataLoader)
        if self._fs is None or self._fs_pid != os.getpid():
            import fsspec

            protocol = self.location.split("://", 1)[0]
            self._fs = fsspec.filesystem(protocol, skip_instance_cache=True, **self.storage_options)
            self._fs_pid = os.getpid()
        return self._fs

    def _fetch_raw(self, rel: str) -> bytes:
        if not self.remote:
            path = Path(self.location) / rel
            if not path.exists():
                raise ShardSetError(f"{path} not found" + (": not a shard set, or its build has not finished"
                                                            if rel == MANIFEST else ""))
            return path.read_bytes()
        try:
            return self._filesystem().cat_file(f"{self.location}/{rel}")
        except FileNotFoundError:
            raise ShardSetError(f"{self.location}/{rel} not found") from None

    def __getstate__(self):  # DataLoader workers: drop the fsspec instance, reopen lazily
        d = dict(self.__dict__)
        d["_fs"] = None
        return d

    # -- checked access
    def read_buffer(self, rel: str):
        """Like `read`, but a local file comes back memory-mapped (no copy into a bytes object):
        the hot path of the loader, which copies each slice out exactly once."""
        if self.remote or rel not in self.files:
            return self.read(rel)
        import mmap

        with open(Path(self.location) / rel, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))

    def read(self, rel: str) -> bytes | None:
        """Bytes of a manifest-listed file (None for a file the manifest does not list)."""
        entry = self.files.get(rel)
        if entry is None:
            return None
        if not self.remote:
            return (Path(self.location) / rel).read_bytes()  # local sets are checked by `verify`
        cached = self.cache / rel
        if cached.exists() and cached.stat().st_size == entry["bytes"]:
            os.utime(cached)  # LRU bookkeeping
            return cached.read_bytes()
        data = self._fetch_raw(rel)
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise ShardSetError(f"corrupted shard {self.location}/{rel}: sha256 {digest[:12]}... does not match "
                                f"the manifest's {entry['sha256'][:12]}...; refusing to use it")
        self._evict(len(data))
        write_bytes(cached, data)
        return data

    def _evict(self, incoming: int) -> None:
        files = [p for p in self.cache.rglob("*") if p.is_file() and not p.name.startswith(".")]
        total = sum(p.stat().st_size for p in files) + incoming
        for p in sorted(files, key=lambda p: p.stat().st_mtime):
            if total <= self.cache_bytes:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)

    # -- manifest views
    def layouts(self) -> list[str]:
        return list(self.manifest["format"]["layouts"])

    def patients(self, split: str) -> list[str]:
        return list(self.manifest["splits"].get(split, []))

    def n_slices(self, pid: str) -> int:
        return self.manifest["patients"][pid]["n_slices"]

    def wds_file(self, pid: str) -> str:
        return self._wds[pid]
