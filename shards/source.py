"""A shard set from a local folder or a URL (http(s)://, s3://, gs://, ... through fsspec).

Everything is learnt from manifest.json, which is untrusted input: `parse_manifest` validates its
whole structure (safe relative paths, plain patient ids, bounded sizes) before anything reads it.

Remote files are fetched into a local cache that is content-addressed: a file lives at
`cache_dir/sha256/<first 2 hex>/<sha256>`, so no text of a manifest ever becomes a cache path,
and a set rebuilt at the same URL (other bytes) never meets its predecessor's files. Every
download is bounded by what the manifest promises (`bytes`): it is streamed and refused as soon
as more arrive, or when fewer do, and its sha256 must match before it is used or cached. A cached
file is re-hashed the first time a process uses it (then remembered as verified) and discarded and
fetched again if its hash is wrong. The cache is bounded in size: least recently used files go.

Transient remote errors (HTTP 5xx/408/429, dropped connections, timeouts) are retried with
exponential backoff; every remote failure ends as a one-line `ShardSetError` naming the URL.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import stat
import time
from pathlib import Path

import numpy as np

from shards import MANIFEST, layout
from shards.atomic import NotRegularFile, open_regular, write_bytes
from shards.contract import ShardFormatError
from shards.errors import BratsShardsError
from shards.remote import MIN_RATE, TooSlow, failure_reason, is_transient
from shards.manifest import MAX_MANIFEST_BYTES, ManifestError, missing_manifest, parse_manifest, read_local, \
    file_plane, plane_view, set_channels
from shards.wds_io import read_wds_patient, sample_key
from shards.zarr_io import read_zarr_patient

_CHUNK = 1 << 20  # one streamed read of a download
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ShardSetError(BratsShardsError, RuntimeError):
    pass


def is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def default_cache_dir() -> Path:
    return Path(os.environ.get("BRATS_SHARDS_CACHE", Path.home() / ".cache" / "brats-shards"))


class ShardSource:
    """Reads files of one shard set by relative path, checked against the manifest.

    cache_dir/cache_bytes: where remote files are kept (content-addressed) and how many bytes at
    most; timeout: seconds a remote request may wait to connect or for its next data before it
    counts as failed; min_rate: bytes per second a download must average after its first
    `timeout` seconds (a download of n bytes thus ends within timeout + n / min_rate seconds, plus
    at most one more `timeout` for a read in flight); retries/backoff: further attempts after a
    transient failure, sleeping backoff, 2*backoff, 4*backoff, ... seconds before them.
    """

    def __init__(self, location: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 cache_bytes: int = 20 * 2**30, storage_options: dict | None = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, min_rate: float = MIN_RATE):
        self.location = str(location).rstrip("/")
        if self.location.startswith("file://"):
            self.location = self.location[7:]
        self.remote = is_url(self.location)
        self.storage_options = storage_options or {}
        self.cache_bytes = cache_bytes
        self.timeout, self.retries, self.backoff = float(timeout), max(0, int(retries)), float(backoff)
        self.min_rate = float(min_rate)
        self._fs, self._fs_pid = None, None
        self._verified: set[str] = set()  # sha256 of cached files this process has hashed
        where = f"{self.location}/{MANIFEST}"
        raw = self._download(MANIFEST, None, MAX_MANIFEST_BYTES) if self.remote else self._local_manifest()
        try:
            self.manifest = parse_manifest(raw, where)
        except ManifestError as e:
            raise ShardSetError(str(e)) from None
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        self.files = {f["path"]: f for f in self.manifest["files"]}
        self.set_manifest, self.plane = self.manifest, "axial"  # until a reader selects another plane
        self._wds = self._tars_of("axial")
        if self.remote:
            self.cache = Path(cache_dir or default_cache_dir()) / "sha256"
            self.cache.mkdir(parents=True, exist_ok=True)

    # -- raw access
    def _local_manifest(self) -> bytes:
        path = Path(self.location) / MANIFEST
        try:
            return read_local(path, MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise ShardSetError(missing_manifest(path)) from None
        except ManifestError as e:
            raise ShardSetError(str(e)) from None

    @property
    def _protocol(self) -> str:
        return self.location.split("://", 1)[0].lower()

    def _filesystem(self):
        # one fsspec instance per process: its event loop does not survive a fork (DataLoader)
        if self._fs is None or self._fs_pid != os.getpid():
            import fsspec

            opts = dict(self.storage_options)
            if self._protocol in ("http", "https"):
                import aiohttp

                # no total limit (a big shard may take long); a silent server fails after `timeout`
                client = dict(opts.get("client_kwargs") or {})
                client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=self.timeout,
                                                                   sock_read=self.timeout))
                opts["client_kwargs"] = client
            elif self._protocol in ("s3", "s3a"):
                config = dict(opts.get("config_kwargs") or {})
                config.setdefault("connect_timeout", self.timeout)
                config.setdefault("read_timeout", self.timeout)
                opts["config_kwargs"] = config
            self._fs = fsspec.filesystem(self._protocol, skip_instance_cache=True, **opts)
            self._fs_pid = os.getpid()
        return self._fs

    def _download(self, rel: str, expected: int | None, limit: int) -> bytes:
        """Bytes of the remote file `rel`: exactly `expected` of them (None: any number up to
        `limit`). Transient failures are retried; every failure is a ShardSetError naming the URL."""
        url = f"{self.location}/{rel}"
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self._download_once(url, expected, limit)
            except ShardSetError:
                raise
            except FileNotFoundError:
                raise ShardSetError(f"{url} not found" + (": not a shard set, or its build has not finished"
                                                          if rel == MANIFEST else "")) from None
            except Exception as e:  # noqa: BLE001 - every remote failure becomes one clean line
                earlier = f" (after {attempt - 1} failed attempt{'s' * (attempt > 2)} retried)" if attempt > 1 else ""
                if not is_transient(e):
                    raise ShardSetError(f"cannot read {url}: {failure_reason(e, self.timeout)}; not retried, "
                                        f"a permanent error{earlier}") from e
                if attempt == attempts:
                    raise ShardSetError(f"cannot read {url}: {failure_reason(e, self.timeout)}; "
                                        f"gave up after {attempts} attempts" if attempts > 1 else
                                        f"cannot read {url}: {failure_reason(e, self.timeout)}; not retried "
                                        f"(no retries allowed)") from e
                time.sleep(self.backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def _download_once(self, url: str, expected: int | None, limit: int) -> bytes:
        fs = self._filesystem()
        if expected is not None:
            limit = expected
        if self._protocol in ("http", "https"):
            # block_size=0: one streaming GET; a size given up front skips fsspec's HEAD request
            f = fs.open(url, "rb", block_size=0, size=max(limit, 1))
        else:
            f = fs.open(url, "rb", block_size=_CHUNK)
        with f:
            size = getattr(f, "size", None)  # what the store says (S3 and others), before any read
            if type(size) is int:
                if expected is not None and size != expected:
                    raise ShardSetError(f"{url} is {size} bytes, the manifest says {expected}; refusing it")
                if size > limit:
                    raise ShardSetError(f"{url} is larger than {limit} bytes; refusing it")
            chunks, got, start = [], 0, time.monotonic()
            while chunk := f.read(min(_CHUNK, limit + 1 - got)):
                got += len(chunk)
                self._check_rate(url, got, expected, start)
                if got > limit:  # one byte more than promised is enough to refuse; stop reading
                    raise ShardSetError(f"{url} sends more than " + (f"the manifest's {expected} bytes"
                                        if expected is not None else f"{limit} bytes") + "; refusing it")
                chunks.append(chunk)
        if expected is not None and got != expected:
            raise ShardSetError(f"{url} ended after {got} bytes, the manifest says {expected}; refusing it")
        return b"".join(chunks)

    def _check_rate(self, url: str, got: int, expected: int | None, start: float) -> None:
        """TooSlow when the transfer has fallen behind `min_rate` after its first `timeout` seconds:
        a server that trickles a byte at a time never trips the per-read timeout."""
        elapsed = time.monotonic() - start
        if elapsed > self.timeout + got / self.min_rate:
            of = f" of {expected}" if expected is not None else ""
            raise TooSlow(f"too slow: {got}{of} bytes in {elapsed:.1f} s, below the minimum average of "
                          f"{self.min_rate / 1024:g} KiB/s")

    def __getstate__(self):  # DataLoader workers: drop the fsspec instance, reopen lazily
        d = dict(self.__dict__)
        d["_fs"] = None
        return d

    # -- local files: a cheap check before the bytes are used (sha256 is `verify`'s job)
    def _open_local(self, rel: str, entry: dict) -> int:
        path = Path(self.location) / rel
        try:
            fd, st = open_regular(path)
        except FileNotFoundError:
            raise ShardSetError(f"{path} not found (listed in the manifest)") from None
        except OSError as e:  # NotRegularFile included
            raise ShardSetError(f"{path} {e.strerror}" if isinstance(e, NotRegularFile)
                                else f"cannot open {path}: {e.strerror}") from None
        if st.st_size != entry["bytes"]:
            os.close(fd)
            raise ShardSetError(f"{path} is {st.st_size} bytes, the manifest says {entry['bytes']}; "
                                f"the set changed after its manifest was written")
        return fd

    # -- remote files: the content-addressed cache
    def _cache_path(self, entry: dict) -> Path:
        digest = entry["sha256"]
        if not isinstance(digest, str) or not _SHA256.match(digest):  # parse_manifest checked it too
            raise ShardSetError(f"{self.location}/{entry.get('path')}: invalid sha256 in the manifest")
        return self.cache / digest[:2] / digest

    def _read_cached(self, path: Path, entry: dict) -> bytes | None:
        """The cached file's bytes if it is there and right (hashed once per process), else None
        (a wrong file is removed)."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(entry["bytes"] + 1) if stat.S_ISREG(st.st_mode) else None
        except FileNotFoundError:  # not cached, or evicted by another process meanwhile
            return None
        except OSError:
            data = None
        digest = entry["sha256"]
        if data is not None and len(data) == entry["bytes"] and \
                (digest in self._verified or hashlib.sha256(data).hexdigest() == digest):
            self._verified.add(digest)
            try:
                os.utime(path)  # LRU bookkeeping
            except OSError:
                pass
            return data
        self._verified.discard(digest)
        try:
            path.unlink()
        except OSError:
            pass
        return None

    # -- checked access
    def read_buffer(self, rel: str):
        """Like `read`, but a local file comes back memory-mapped (no copy into a bytes object):
        the hot path of the loader, which copies each slice out exactly once."""
        entry = self.files.get(rel)
        if self.remote or entry is None:
            return self.read(rel)
        fd = self._open_local(rel, entry)
        try:
            if entry["bytes"] == 0:
                return b""
            return memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_READ))
        finally:
            os.close(fd)

    def read(self, rel: str) -> bytes | None:
        """Bytes of a manifest-listed file (None for a file the manifest does not list)."""
        entry = self.files.get(rel)
        if entry is None:
            return None
        if not self.remote:
            fd = self._open_local(rel, entry)
            with os.fdopen(fd, "rb") as f:
                return f.read(entry["bytes"])
        cached = self._cache_path(entry)
        data = self._read_cached(cached, entry)
        if data is not None:
            return data
        data = self._download(rel, entry["bytes"], entry["bytes"])
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise ShardSetError(f"corrupted shard {self.location}/{rel}: sha256 {digest[:12]}... does not match "
                                f"the manifest's {entry['sha256'][:12]}...; refusing to use it")
        self._evict(len(data))
        write_bytes(cached, data)
        self._verified.add(digest)
        return data

    def _evict(self, incoming: int) -> None:
        files = []
        for p in self.cache.glob("??/*"):
            if _SHA256.match(p.name):
                try:
                    st = p.stat()
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files) + incoming
        for _, size, p in sorted(files, key=lambda t: t[0]):
            if total <= self.cache_bytes:
                break
            total -= size
            p.unlink(missing_ok=True)
            self._verified.discard(p.name)

    # -- manifest views
    def select_plane(self, plane: str) -> "ShardSource":
        """Read `plane`'s slices from now on (a set built with `--planes`): `manifest` becomes that
        plane's view (`shards.manifest.plane_view`); the file's own stays in `set_manifest`."""
        try:
            self.manifest = plane_view(self.set_manifest, plane)
        except ManifestError as e:
            raise ShardSetError(f"{self.location}: {e}") from None
        self.plane = plane
        self._wds = self._tars_of(plane)
        return self

    def _tars_of(self, plane: str) -> dict[str, str]:
        """patient -> the path of its `plane` tar."""
        return {f["patient"]: f["path"] for f in self.set_manifest["files"]
                if f["format"] == "wds" and file_plane(f) == plane}

    def layouts(self) -> list[str]:
        return list(self.manifest["format"]["layouts"])

    def patients(self, split: str) -> list[str]:
        return list(self.manifest["splits"].get(split, []))

    def n_slices(self, pid: str) -> int:
        return self.manifest["patients"][pid]["n_slices"]

    def wds_file(self, pid: str) -> str:
        return self._wds[pid]

    # -- the one way to read a patient
    def read_patient(self, pid: str, fmt: str, per_slice: bool = False):
        """(image, mask, keys) of patient `pid` from the set's `fmt` files ('zarr' or 'wds'): image
        (S, M, H, W) float16, mask (S, K, H, W) uint8 (M, K: `shards.manifest.set_channels`), keys `sample_key(pid, i)`; per_slice=True
        gives lists of (C, H, W) arrays that each own their memory (a slice kept in a shuffle
        buffer does not pin its patient). Read bounded by the manifest's n_slices: content that
        does not match it or the contract is a ShardFormatError naming the file."""
        if fmt not in self.layouts():
            raise ShardSetError(f"the shard set {self.location} holds {self.layouts()}, not {fmt}")
        p = self.manifest["patients"].get(pid)
        if p is None:
            raise ShardSetError(f"patient {pid} is not in the shard set {self.location}")
        n = p["n_slices"]
        if fmt == "zarr":
            group = layout.zarr_plane_group(p["split"], pid, self.plane)
            where = f"{self.location}/{group}"
            image, mask = read_zarr_patient(self.read_buffer, group, per_slice=per_slice, n_slices=n, where=where)
            self._check_channels(image, mask, where)
            return image, mask, [sample_key(pid, i) for i in range(n)]
        rel = self._wds.get(pid)
        if rel is None:
            raise ShardFormatError(f"{self.location}/{MANIFEST} lists no WebDataset shard for patient {pid}")
        data = self.read_buffer(rel)
        if data is None:
            raise ShardFormatError(f"{self.location}/{rel}: not listed in the manifest")
        images, masks, keys = read_wds_patient(data, n_slices=n, pid=pid, where=f"{self.location}/{rel}")
        self._check_channels(images, masks, f"{self.location}/{rel}")
        if per_slice:
            return images, masks, keys
        if not images:  # no slices: the shapes come from the manifest
            size, (mods, chans) = self.manifest["config"]["preprocess"]["size"], set_channels(self.manifest)
            return (np.zeros((0, len(mods), size, size), np.float16), np.zeros((0, len(chans), size, size), np.uint8),
                    keys)
        return np.stack(images), np.stack(masks), keys

    def _check_channels(self, image, mask, where: str) -> None:
        """The image and mask channels the manifest promises (M modalities, K mask channels)."""
        mods, chans = set_channels(self.manifest)
        if len(image) and (image[0].shape[-3] != len(mods) or mask[0].shape[-3] != len(chans)):
            raise ShardFormatError(f"{where}: image/mask slices have {image[0].shape[-3]}/{mask[0].shape[-3]} "
                                   f"channels, the manifest says {len(mods)} ({', '.join(mods)}) / "
                                   f"{len(chans)} ({', '.join(chans)})")
