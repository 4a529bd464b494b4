import io

import numpy as np
import pytest

from shards import readers, wds_io, zarr_io


@pytest.mark.parametrize("codec", ["blosc-lz4:5", "blosc-zstd:3", "zstd:3", "none"])
def test_direct_zarr_decode_matches_zarr(tmp_path, codec):
    import zarr

    rng = np.random.default_rng(0)
    image = rng.normal(size=(7, 4, 16, 16)).astype(np.float16)
    mask = np.zeros((7, 3, 16, 16), np.uint8)
    mask[2, 1, 3:9, 4:6] = 1  # most mask chunks are empty: never written, read as the fill value
    zarr_io.write_patient(tmp_path / "p", image, mask, {"a": 1}, codec)
    read = lambda rel: (tmp_path / rel).read_bytes() if (tmp_path / rel).exists() else None  # noqa: E731
    im, mk = readers.read_zarr_patient(read, "p")
    g = zarr.open_group(str(tmp_path / "p"), mode="r")
    assert np.array_equal(im, g["image"][:]) and np.array_equal(mk, g["mask"][:])
    assert np.array_equal(im, image) and np.array_equal(mk, mask)
    ims, mks = readers.read_zarr_patient(read, "p", per_slice=True)
    assert np.array_equal(np.stack(ims), image) and np.array_equal(np.stack(mks), mask)
    assert all(a.base is None for a in ims)  # each slice owns its memory: nothing pins the patient


def test_wds_fast_reader_matches_tarfile(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(5, 4, 8, 8)).astype(np.float16)
    mask = (rng.random((5, 3, 8, 8)) > 0.7).astype(np.uint8)
    p, _ = wds_io.write_patient(tmp_path / "x.tar", "BraTS20_Training_001", "train", image, mask, [3, 4, 5, 6, 9])
    data = p.read_bytes()
    ims, mks, keys = readers.read_wds_patient(data)
    ref = list(wds_io.iter_tar(io.BytesIO(data)))
    assert keys == [s["__key__"] for s in ref] == [f"BraTS20_Training_001_s{i:03d}" for i in range(5)]
    assert np.array_equal(np.stack(ims), image) and np.array_equal(np.stack(mks), mask)
    assert [s["meta"]["source_slice"] for s in ref] == [3, 4, 5, 6, 9]


def test_npy_view_refuses_pickles():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object"):
        readers.npy_view(memoryview(buf.getvalue()))
    buf = io.BytesIO()
    np.save(buf, np.arange(6, dtype=np.int32).reshape(2, 3))
    assert readers.npy_view(memoryview(buf.getvalue())).tolist() == [[0, 1, 2], [3, 4, 5]]
