import nibabel as nib
import numpy as np
import pytest

from preprocess.nifti import decode_only, load_volume, save_volume


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.uint16])
@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_load_matches_nibabel(tmp_path, dtype, ext):
    rng = np.random.default_rng(0)
    data = (rng.random((7, 6, 5)) * 200).astype(dtype)
    aff = np.diag([-1.0, -1.0, 2.0, 1.0])
    p = tmp_path / f"v{ext}"
    save_volume(p, data, aff)
    v = load_volume(p)
    assert v.data.dtype == dtype and np.array_equal(v.data, data)
    assert np.array_equal(v.data, np.asanyarray(nib.load(p).dataobj))
    assert np.allclose(v.affine, aff) and len(v.sha256) == 64 and v.nbytes == p.stat().st_size
    assert decode_only(p) >= data.nbytes


def test_scaled_data_applies_slope(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    p = tmp_path / "s.nii"
    save_volume(p, data, np.eye(4))
    raw = bytearray(p.read_bytes())
    raw[112:120] = np.array([0.5, 10.0], "<f4").tobytes()  # scl_slope, scl_inter in the header
    p.write_bytes(bytes(raw))
    assert (nib.load(p).dataobj.slope, nib.load(p).dataobj.inter) == (0.5, 10.0)
    v = load_volume(p)
    assert np.allclose(v.data, data * 0.5 + 10)
