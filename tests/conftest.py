"""Shared fixtures: tiny synthetic releases written on the fly (no real data, no network)."""

from __future__ import annotations

import functools
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from preprocess.synthetic.toy import make_demo_data

TINY = (48, 48, 24)


@pytest.fixture(scope="session")
def release_2020(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats2020")
    make_demo_data(root, 6, shape=TINY, release="2020", seed=1)
    return root


@pytest.fixture(scope="session")
def release_2023(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats2023")
    make_demo_data(root, 3, shape=TINY, release="2023", seed=2)
    return root


@pytest.fixture
def release_copy(release_2020, tmp_path) -> Path:
    """A private copy a test may damage."""
    dst = tmp_path / "input"
    shutil.copytree(release_2020, dst)
    return dst


# patient ids with a dot, one per split at val_fraction 0.2 (split scores 0.16 and 0.27): sample
# keys write '.' as '_', so a reader that parses ids back from keys gets these wrong
DOTTED = {"BraTS20_Training_004": "BraTS20_Training.004",  # val
          "BraTS20_Training_005": "BraTS20_Training.005"}  # train


@pytest.fixture(scope="session")
def release_dotted(release_2020, tmp_path_factory) -> Path:
    """release_2020 with the cases of DOTTED renamed (folder, files, name_mapping.csv): discovery
    takes a patient's id from its folder name and its files' names from that id."""
    root = tmp_path_factory.mktemp("dotted") / "input"
    shutil.copytree(release_2020, root)
    for old, new in DOTTED.items():
        for path in (root / old).iterdir():
            path.rename(path.with_name(new + path.name.removeprefix(old)))
        (root / old).rename(root / new)
    mapping = root / "name_mapping.csv"
    text = mapping.read_text()
    for old, new in DOTTED.items():
        text = text.replace(f",{old}\n", f",{new}\n")
    mapping.write_text(text)
    return root


def _build_set(release: Path, out: Path) -> Path:
    from preprocess.config import PreprocessConfig
    from preprocess.build import BuildConfig, build

    build(release, out, BuildConfig(preprocess=PreprocessConfig(size=32), val_fraction=0.2), workers=0,
          progress=False)
    return out


@pytest.fixture(scope="session")
def shard_set(release_2020, tmp_path_factory) -> Path:
    """A small built shard set (both formats, 32x32 slices, 6 patients)."""
    return _build_set(release_2020, tmp_path_factory.mktemp("shards") / "set")


@pytest.fixture(scope="session")
def shard_set_dotted(release_dotted, tmp_path_factory) -> Path:
    """shard_set's patients, two of them (one train, one val) with the dotted ids of DOTTED."""
    return _build_set(release_dotted, tmp_path_factory.mktemp("shards_dotted") / "set")


# -- a local HTTP server of a shard set, for the remote reader's tests

class _Handler(SimpleHTTPRequestHandler):
    hooks: dict = {}  # URL path -> hook(handler) -> True when it answered the request itself
    requests: dict = {}  # URL path -> GET requests seen

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        self.requests[path] = self.requests.get(path, 0) + 1
        hook = self.hooks.get(path) or self.hooks.get("*")
        if hook is not None and hook(self):
            return
        super().do_GET()


@pytest.fixture
def serve():
    """serve(directory, hooks) -> (base URL, requests per path): a local HTTP server of a folder whose
    hooks misbehave per path (remote shard set tests)."""
    servers, release = [], threading.Event()

    def start(directory, hooks=None):
        requests = {}
        handler = type("H", (_Handler,), {"hooks": hooks or {}, "requests": requests})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", requests

    start.release = release  # hanging hooks wait on it; set at teardown
    yield start
    release.set()
    for s in servers:
        s.shutdown()
        s.server_close()
