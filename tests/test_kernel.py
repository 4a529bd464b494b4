"""preprocess/kernel.py and the one-pass writers: the compiled kernel gives the numpy path's bytes,
the fallback is chosen as documented, and a whole build gives the same files either way."""

import hashlib
import io
import json
import platform
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from preprocess import kernel, resample
from preprocess.build import BuildConfig, build
from preprocess.config import PreprocessConfig
from preprocess.steps import brain_mask
from shards import wds_io, zarr_io
from shards.npy import npy_bytes

needs_numba = pytest.mark.skipif(kernel._numba_kernels() is None, reason="numba not installed (the 'fast' extra)")


def _with(monkeypatch, choice, fn, *args):
    monkeypatch.setenv(kernel.ENV, choice)
    return fn(*args)


def _volumes(rng, shape, dtype, n=4):
    """n volumes with background zeros and mixed memory layouts (C, Fortran, flipped and transposed
    views), as canonical views of NIfTI data are."""
    out = []
    for c in range(n):
        if dtype == np.uint8:
            a = rng.integers(0, 255, shape).astype(dtype)
        else:
            a = (rng.normal(0, 300, shape) * (rng.random(shape) > 0.3)).astype(dtype)
        a = [a, np.asfortranarray(a), np.ascontiguousarray(a[::-1, :, ::-1])[::-1, :, ::-1],
             np.asfortranarray(a.transpose(1, 0, 2)).transpose(1, 0, 2)][c % 4]
        out.append(a)
    return out


# (volume shape, in-plane box (x0, x1, y0, y1), size): downscaling, upscaling, odd sizes, crop
# boxes, a plane already size x size (no resampling), one axis already at size
CASES = [((240, 240, 20), (0, 240, 0, 240), 128), ((97, 53, 11), (3, 90, 5, 50), 40),
         ((60, 60, 9), (0, 60, 0, 60), 60), ((30, 41, 7), (2, 29, 1, 40), 64),
         ((50, 50, 5), (10, 34, 10, 34), 24), ((96, 96, 12), (5, 77, 9, 81), 48),
         ((33, 47, 4), (0, 33, 0, 47), 33), ((17, 9, 3), (0, 17, 0, 9), 128)]


@needs_numba
@pytest.mark.parametrize("shape,box,size", CASES)
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8, np.float64])
@pytest.mark.parametrize("per_slice", [False, True])
def test_kernel_gives_the_numpy_bytes(monkeypatch, shape, box, size, dtype, per_slice):
    rng = np.random.default_rng(abs(hash((shape, size, np.dtype(dtype).str, per_slice))) % 2**32)
    images = _volumes(rng, shape, dtype)
    brain = brain_mask(images)
    z = sorted(rng.choice(shape[2], size=max(1, shape[2] // 2), replace=False).tolist())
    if per_slice:
        means = [rng.normal(0, 5, (len(z), 1, 1)).astype(np.float32) for _ in images]
        stds = [rng.uniform(0.5, 300, (len(z), 1, 1)).astype(np.float32) for _ in images]
    else:
        means = [np.float32(rng.normal(0, 50)) for _ in images]
        stds = [np.float32(rng.uniform(0.5, 300)) for _ in images]
    args = (images, brain, box, z, size, means, stds)
    a = _with(monkeypatch, "numpy", kernel.normalised_slices, *args)
    b = _with(monkeypatch, "numba", kernel.normalised_slices, *args)
    assert a.dtype == b.dtype == np.float16 and a.shape == b.shape == (len(z), 4, size, size)
    assert a.tobytes() == b.tobytes()
    for img in images[:2]:  # Geometry.to_slices' path
        r = _with(monkeypatch, "numpy", kernel.resize_slices, img, box, z, size)
        s = _with(monkeypatch, "numba", kernel.resize_slices, img, box, z, size)
        assert r.tobytes() == s.tobytes()


@needs_numba
def test_kernel_keeps_signed_zeros_and_no_slices(monkeypatch):
    """-0.0 decides a float16 byte: zero-weight taps are added as in numpy, so the signs agree."""
    img = np.zeros((20, 20, 3), np.float32)
    img[5:9, 5:9] = -1e-30  # products underflow to -0.0
    brain = img != 0
    args = ([img], brain, (0, 20, 0, 20), [0, 1, 2], 7, [np.float32(0)], [np.float32(1)])
    a = _with(monkeypatch, "numpy", kernel.normalised_slices, *args)
    b = _with(monkeypatch, "numba", kernel.normalised_slices, *args)
    assert a.tobytes() == b.tobytes() and np.signbit(a).any()
    empty = ([img], brain, (0, 20, 0, 20), [], 7, [np.float32(0)], [np.float32(1)])
    assert _with(monkeypatch, "numba", kernel.normalised_slices, *empty).shape == (0, 1, 7, 7)


@needs_numba
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.uint16, np.int8])
@pytest.mark.parametrize("order", ["C", "F"])
def test_brain_and_sums_are_exact(monkeypatch, dtype, order):
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    vols = []
    for _ in range(4):
        v = rng.integers(info.min, info.max, (31, 17, 9), endpoint=True).astype(dtype)
        v[rng.random(v.shape) < 0.4] = 0
        vols.append(np.asarray(v, order=order))
    brain, sums = _with(monkeypatch, "numba", kernel.brain_and_sums, vols)
    assert sums == [(int(v.sum(dtype=np.int64)), int((v.astype(np.int64) ** 2).sum())) for v in vols]
    assert np.array_equal(brain, brain_mask(vols)) and brain.dtype == np.bool_
    # numpy path, floats, or mixed layouts: no sums (the caller computes the statistics)
    assert _with(monkeypatch, "numpy", kernel.brain_and_sums, vols)[1] is None
    assert _with(monkeypatch, "numba", kernel.brain_and_sums, [v.astype(np.float32) for v in vols])[1] is None
    mixed = [vols[0], np.asarray(vols[1], order="F" if order == "C" else "C")]
    b2, s2 = _with(monkeypatch, "numba", kernel.brain_and_sums, mixed)
    assert s2 is None and np.array_equal(b2, brain_mask(mixed))


@needs_numba
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 mnemonics")
def test_kernel_machine_code_has_no_fma():
    """The determinism argument in preprocess/kernel.py: compiled as the build compiles it (no
    fastmath), the kernel holds no fused multiply-add; the same source with fastmath does, on a
    CPU that has FMA (the control: the pattern and the CPU can show one)."""
    import numba

    rng = np.random.default_rng(0)
    images = _volumes(rng, (40, 40, 3), np.int16)
    from preprocess import kernel_numba

    iy, wy = resample.taps(40, 16)
    out = np.empty((2, 1, 16, 16), np.float32)
    args = (images[0], 0, 0, 40, 40, np.array([0, 2]), iy, wy, iy, wy, out, np.ones(2, np.float32),
            np.full(2, 2, np.float32), out, np.empty((2, 1, 16, 16), np.uint16), 0)
    fma = re.compile(r"\bvfn?m(add|sub)")

    def asm_of(**opts):
        f = numba.njit(**opts)(kernel_numba.slices_kernel.py_func)  # not cached: inspect_asm needs a fresh compile
        f(*args)
        return "\n".join(f.inspect_asm().values())

    assert not fma.search(asm_of())
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "fma" in cpuinfo.read_text().split():
        assert fma.search(asm_of(fastmath=True))


@needs_numba
def test_half_conversion_is_numpys():
    """kernel_numba.half_bits against numpy's float32 -> float16 cast: every float32 whose exponent
    lies where halves are subnormal, normal-boundary or overflow (the hard cases: every 7th
    mantissa, and the lowest and highest 2**13, where ties and carries are), and a stride through all 2**32 bit patterns. (All 2**32 were compared once,
    by hand: the finite ones all agree; NaN becomes Inf, and the recipe refuses both.)"""
    from preprocess.kernel_numba import half_bits_array

    exps = list(range(101, 115)) + [142, 143]
    mantissas = np.concatenate([np.arange(0, 2**23, 7), np.arange(2**13), 2**23 - 1 - np.arange(2**13)])
    parts = [mantissas.astype(np.uint32) | np.uint32(e << 23) for e in exps]
    parts.append(np.arange(0, 2**32, 65537, dtype=np.uint64).astype(np.uint32))
    bits = np.concatenate(parts)
    bits = np.concatenate([bits, bits | np.uint32(2**31)])  # both signs
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    out = np.empty(x.shape, np.uint16)
    half_bits_array(x, out)
    with np.errstate(over="ignore"):
        assert np.array_equal(out, x.astype(np.float16).view(np.uint16))
    special = np.array([np.nan, np.inf, -np.inf, 65519.99, 65520.0, -65520.0], np.float32)
    half_bits_array(special, out[:6])
    assert out[:6].tolist() == [0x7C00, 0x7C00, 0xFC00, 0x7BFF, 0x7C00, 0xFC00]


def test_fallback_selection(monkeypatch):
    monkeypatch.setenv(kernel.ENV, "numpy")
    assert kernel.which() == "numpy"
    monkeypatch.setenv(kernel.ENV, "bogus")
    with pytest.raises(ValueError, match="BRATS_SHARDS_KERNEL"):
        kernel.which()
    monkeypatch.setattr(kernel, "_numba_kernels", lambda: None)  # as if numba were not installed
    monkeypatch.delenv(kernel.ENV)
    assert kernel.which() == "numpy"
    monkeypatch.setenv(kernel.ENV, "numba")
    with pytest.raises(RuntimeError, match="numba is not installed"):
        kernel.which()
    monkeypatch.setenv(kernel.ENV, "auto")
    img = np.arange(2 * 10 * 10 * 3, dtype=np.int16).reshape(10, 10, 6)
    out = kernel.normalised_slices([img], img != 0, (0, 10, 0, 10), [1, 4], 6, [np.float32(3)], [np.float32(2)])
    assert out.shape == (2, 1, 6, 6) and out.dtype == np.float16


def test_bad_choice_refuses_the_build(monkeypatch, release_2020, tmp_path):
    from preprocess.build import BuildError

    monkeypatch.setenv(kernel.ENV, "fastest")
    with pytest.raises(BuildError, match="BRATS_SHARDS_KERNEL='fastest'"):
        build(release_2020, tmp_path / "s", BuildConfig(), workers=0, progress=False)
    assert not (tmp_path / "s").exists()


@needs_numba
def test_auto_prefers_numba(monkeypatch):
    monkeypatch.delenv(kernel.ENV, raising=False)
    assert kernel.which() == "numba"


def _files(out):
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("crop,size", [(True, 24), (False, 48)])
def test_build_bytes_do_not_depend_on_the_path(monkeypatch, release_2020, tmp_path, crop, size):
    """The whole shard set, every file, is the same with the numba kernel, the numpy fallback,
    and zarr's own shard writer."""
    cfg = BuildConfig(preprocess=PreprocessConfig(size=size, crop=crop))
    monkeypatch.setenv(kernel.ENV, "numpy")
    monkeypatch.setattr(zarr_io, "_direct_ok", lambda: False)  # zarr writes every chunk itself
    ref = build(release_2020, tmp_path / "ref", cfg, workers=0, progress=False).manifest
    monkeypatch.undo()
    for choice in ("numpy", "auto"):
        monkeypatch.setenv(kernel.ENV, choice)
        m = build(release_2020, tmp_path / choice, cfg, workers=0, progress=False).manifest
        assert json.dumps(m, sort_keys=True) == json.dumps(ref, sort_keys=True)
        assert _files(tmp_path / choice) == _files(tmp_path / "ref")


# ---------------------------------------------------------------- the one-pass writers

def test_direct_shard_matches_zarr(tmp_path):
    assert zarr_io._direct_ok()
    rng = np.random.default_rng(5)
    image = rng.normal(size=(9, 4, 7, 5)).astype(np.float16)
    image[0], image[4], image[8] = 0.0, -0.0, 0.0
    mask = (rng.random((9, 3, 7, 5)) < 0.1).astype(np.uint8)
    mask[:3] = 0
    for codec in ("blosc-lz4:5", "blosc-zstd:3", "none", "zstd:3"):
        zarr_io._write_group(tmp_path / f"a{codec}", image, mask, {"k": [1]}, codec, direct=False)
        zarr_io._write_group(tmp_path / f"b{codec}", image, mask, {"k": [1]}, codec, direct=True)
        assert zarr_io._tree(tmp_path / f"a{codec}") == zarr_io._tree(tmp_path / f"b{codec}")


def test_direct_shard_self_check_falls_back(monkeypatch):
    """A direct writer that disagrees with zarr is not used."""
    zarr_io._direct_ok.cache_clear()
    real = zarr_io.shard_bytes
    monkeypatch.setattr(zarr_io, "shard_bytes", lambda arr, enc: None if arr.dtype == np.uint8 else real(arr, enc))
    try:
        assert zarr_io._direct_ok() is False
    finally:
        zarr_io._direct_ok.cache_clear()


def _tarfile_reference(pid, split, image, mask, slice_index):
    """wds_io.write_patient's bytes as the tarfile module writes them (the writer before this change)."""
    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, z in enumerate(slice_index):
            key = wds_io.sample_key(pid, i)
            meta = {"patient": pid, "slice": i, "source_slice": int(z), "split": split}
            add(tar, f"{key}.image.npy", npy_bytes(image[i]))
            add(tar, f"{key}.mask.npy", npy_bytes(mask[i]))
            add(tar, f"{key}.meta.json", json.dumps(meta, sort_keys=True).encode())
    return buf.getvalue()


@pytest.mark.parametrize("n,h", [(0, 8), (1, 8), (3, 5), (11, 16)])
def test_one_buffer_tar_matches_tarfile(tmp_path, n, h):
    rng = np.random.default_rng(n)
    image = rng.normal(size=(n, 4, h, h)).astype(np.float16)
    mask = (rng.random((n, 3, h, h)) < 0.2).astype(np.uint8)
    path, digest = wds_io.write_patient(tmp_path / "p.tar", "P.x-1", "val", image, mask, list(range(2, 2 + n)))
    ref = _tarfile_reference("P.x-1", "val", image, mask, list(range(2, 2 + n)))
    assert path.read_bytes() == ref and digest == hashlib.sha256(ref).hexdigest()
