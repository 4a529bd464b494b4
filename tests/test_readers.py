import io

import numpy as np
import pytest

from reference import tar_samples  # tests/reference.py
from shards import npy, wds_io, zarr_io
from shards.contract import ShardFormatError


@pytest.mark.parametrize("codec", ["blosc-lz4:5", "blosc-zstd:3", "zstd:3", "none"])
def test_direct_zarr_decode_matches_zarr(tmp_path, codec):
    import zarr

    rng = np.random.default_rng(0)
    image = rng.normal(size=(7, 4, 16, 16)).astype(np.float16)
    mask = np.zeros((7, 3, 16, 16), np.uint8)
    mask[2, 1, 3:9, 4:6] = 1  # most mask chunks are empty: never written, read as the fill value
    zarr_io.write_patient(tmp_path / "p", image, mask, {"a": 1}, codec)
    read = lambda rel: (tmp_path / rel).read_bytes() if (tmp_path / rel).exists() else None  # noqa: E731
    im, mk = zarr_io.read_zarr_patient(read, "p")
    g = zarr.open_group(str(tmp_path / "p"), mode="r")
    assert np.array_equal(im, g["image"][:]) and np.array_equal(mk, g["mask"][:])
    assert np.array_equal(im, image) and np.array_equal(mk, mask)
    ims, mks = zarr_io.read_zarr_patient(read, "p", per_slice=True)
    assert np.array_equal(np.stack(ims), image) and np.array_equal(np.stack(mks), mask)
    assert all(a.base is None for a in ims)  # each slice owns its memory: nothing pins the patient


def test_wds_fast_reader_matches_tarfile(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(5, 4, 8, 8)).astype(np.float16)
    mask = (rng.random((5, 3, 8, 8)) > 0.7).astype(np.uint8)
    p, _ = wds_io.write_patient(tmp_path / "x.tar", "BraTS20_Training_001", "train", image, mask, [3, 4, 5, 6, 9])
    data = p.read_bytes()
    ims, mks, keys = wds_io.read_wds_patient(data)
    ref = tar_samples(io.BytesIO(data))
    assert keys == [s["__key__"] for s in ref] == [f"BraTS20_Training_001_s{i:03d}" for i in range(5)]
    assert np.array_equal(np.stack(ims), image) and np.array_equal(np.stack(mks), mask)
    assert [s["meta"]["source_slice"] for s in ref] == [3, 4, 5, 6, 9]


def test_npy_view_refuses_pickles():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object"):
        npy.npy_view(memoryview(buf.getvalue()))
    buf = io.BytesIO()
    np.save(buf, np.arange(6, dtype=np.int32).reshape(2, 3))
    assert npy.npy_view(memoryview(buf.getvalue())).tolist() == [[0, 1, 2], [3, 4, 5]]


# -- bounded by the manifest and the contract: malformed content is a one-line ShardFormatError -------------

def _zarr_patient(tmp_path, codec="blosc-lz4:5", n=5):
    rng = np.random.default_rng(2)
    image = rng.normal(size=(n, 4, 16, 16)).astype(np.float16)
    mask = (rng.random((n, 3, 16, 16)) > 0.5).astype(np.uint8)
    zarr_io.write_patient(tmp_path / "p", image, mask, {}, codec)
    return (lambda rel: (tmp_path / rel).read_bytes() if (tmp_path / rel).exists() else None), image, mask  # noqa: E731


def test_zarr_reader_refuses_a_slice_count_other_than_the_manifests(tmp_path):
    read, image, _ = _zarr_patient(tmp_path)
    im, _ = zarr_io.read_zarr_patient(read, "p", n_slices=5)
    assert np.array_equal(im, image)
    with pytest.raises(ShardFormatError, match=r"p/image/zarr.json: claims 5 slices, the manifest says 6"):
        zarr_io.read_zarr_patient(read, "p", n_slices=6)


def test_zarr_metadata_claiming_terabytes_is_refused_before_allocating(tmp_path):
    import json

    read, _, _ = _zarr_patient(tmp_path)
    meta = json.loads(read("p/image/zarr.json"))
    meta["shape"][0] = meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 10**9
    (tmp_path / "p/image/zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ShardFormatError, match="claims 1000000000 slices"):
        zarr_io.read_zarr_patient(read, "p", per_slice=True, n_slices=5)
    with pytest.raises(ShardFormatError, match="MiB per array"):  # no manifest: the contract's bound
        zarr_io.read_zarr_patient(read, "p", per_slice=True)


@pytest.mark.parametrize("codec", ["blosc-zstd:3", "zstd:3", "none"])
def test_zarr_chunk_decoding_to_another_size_is_refused(tmp_path, codec):
    """Each codec's frame is checked against the slice size before it is decoded into it."""
    import struct

    import google_crc32c

    read, image, _ = _zarr_patient(tmp_path, codec)
    rel = "p/image/c/0/0/0/0"
    data = read(rel)
    n = 5
    index = np.frombuffer(data, "<u8", count=2 * n, offset=len(data) - 16 * n - 4).reshape(n, 2).copy()
    half = np.zeros((4, 16, 8), np.float16)
    from numcodecs import Blosc, Zstd

    wrong = {"blosc-zstd:3": lambda a: Blosc(cname="zstd").encode(a), "zstd:3": lambda a: Zstd().encode(a),
             "none": lambda a: a.tobytes()}[codec](half)
    body = data[: len(data) - 16 * n - 4]
    index[0] = (len(body), len(wrong))
    idx = index.astype("<u8").tobytes()
    (tmp_path / rel).write_bytes(body + bytes(wrong) + idx + struct.pack("<I", google_crc32c.value(idx)))
    with pytest.raises(ShardFormatError, match=r"p/image/c/0/0/0/0: chunk 0: .*a slice is 2048"):
        zarr_io.read_zarr_patient(read, "p", n_slices=5)


def test_wds_reader_refuses_more_samples_than_promised_before_decoding_them(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.normal(size=(4, 4, 8, 8)).astype(np.float16)
    mask = np.zeros((4, 3, 8, 8), np.uint8)
    p, _ = wds_io.write_patient(tmp_path / "x.tar", "BraTS20_Training_001", "train", image, mask, [0, 1, 2, 3])
    data = p.read_bytes()
    ims, _, keys = wds_io.read_wds_patient(data, n_slices=4, pid="BraTS20_Training_001", where="x.tar")
    assert np.array_equal(np.stack(ims), image) and len(keys) == 4
    with pytest.raises(ShardFormatError, match="x.tar: holds more than the manifest's 3 samples"):
        wds_io.read_wds_patient(data, n_slices=3, where="x.tar")
    with pytest.raises(ShardFormatError, match="x.tar: 4 samples, the manifest says 5"):
        wds_io.read_wds_patient(data, n_slices=5, where="x.tar")
    with pytest.raises(ShardFormatError, match="where the contract has 'Other_s000.image.npy'"):
        wds_io.read_wds_patient(data, n_slices=4, pid="Other", where="x.tar")


def test_tar_reader_refuses_bad_tars_and_npys_in_one_line(tmp_path):
    p, _ = wds_io.write_patient(tmp_path / "x.tar", "P", "train", np.zeros((1, 4, 8, 8), np.float16),
                                np.zeros((1, 3, 8, 8), np.uint8), [0])
    data = p.read_bytes()
    with pytest.raises(ShardFormatError, match="x.tar"):
        wds_io.read_wds_patient(data[:700], where="x.tar")
    big = np.lib.format.header_data_from_array_1_0(np.zeros((4, 8, 8), np.float16))
    big["shape"] = (4, 10**6, 10**6)  # 8 TB promised, 512 bytes present
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, big)
    with pytest.raises(ShardFormatError, match="npy data is 0 bytes"):
        npy.read_npy(buf.getvalue())


def test_one_read_api_gives_the_same_patient_from_both_formats(shard_set):
    """ShardSource.read_patient: zarr and wds give the same slices and keys, whole or per slice,
    each at the paths `shards.layout` names; an unknown patient or format is refused."""
    from shards import layout
    from shards.source import ShardSetError, ShardSource

    src = ShardSource(shard_set)
    for pid in src.patients("train") + src.patients("val"):
        n, split = src.n_slices(pid), src.manifest["patients"][pid]["split"]
        zi, zm, zk = src.read_patient(pid, "zarr")
        wi, wm, wk = src.read_patient(pid, "wds")
        assert zi.shape == (n, 4, 32, 32) and zi.dtype == np.float16 and zm.shape == (n, 3, 32, 32)
        assert np.array_equal(zi, wi) and np.array_equal(zm, wm) and zk == wk
        assert zk == [wds_io.sample_key(pid, i) for i in range(n)]
        assert int(zm.sum()) == sum(src.manifest["patients"][pid]["mask_pixels"])
        si, sm, _ = src.read_patient(pid, "zarr", per_slice=True)
        assert len(si) == n and all(np.array_equal(a, b) for a, b in zip(si, zi))
        assert all(np.array_equal(a, b) for a, b in zip(sm, zm))
        assert set(layout.zarr_patient_files(split, pid)) <= set(src.files)
        assert src.wds_file(pid).startswith(f"wds/{split}-") and src.wds_file(pid) in src.files
    with pytest.raises(ShardSetError, match="patient nobody is not in"):
        src.read_patient("nobody", "zarr")
    with pytest.raises(ShardSetError, match="not parquet"):
        src.read_patient(src.patients("val")[0], "parquet")


def test_a_slice_that_is_not_three_dimensional_is_one_format_error(tmp_path):
    """A tar whose image member is 1-D: the contract's shape check names it (its message once
    called a helper that was not there: a NameError instead of the refusal)."""
    from shards.contract import slice_shape_problem

    assert "is not three integers" in slice_shape_problem("image", (7,))
    p, _ = wds_io.write_patient(tmp_path / "x.tar", "P", "train", np.zeros((1, 1, 8, 8), np.float16),
                                np.zeros((1, 1, 8, 8), np.uint8), [0])
    members = tar_samples(io.BytesIO(p.read_bytes()))
    assert len(members) == 1
    flat = wds_io.tar_bytes([("P_s000.image.npy", [npy.npy_bytes(np.zeros(64, np.float16))]),
                             ("P_s000.mask.npy", [npy.npy_bytes(np.zeros((1, 8, 8), np.uint8))]),
                             ("P_s000.meta.json", [b"{}"])])
    with pytest.raises(ShardFormatError, match=r"x.tar: P_s000.image.npy: shape \(64,\) is not three integers"):
        wds_io.read_wds_patient(bytes(flat), where="x.tar")
