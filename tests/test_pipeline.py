import numpy as np
import pytest

from preprocess.discover import discover
from preprocess.nifti import load_volume, save_volume
from preprocess.config import PreprocessConfig
from preprocess.pipeline import process_patient
from preprocess.errors import InputError
from preprocess.synthetic.cases import write_case
from preprocess.synthetic.toy import make_case

SHAPE = (48, 48, 24)


def _patient(root, pid=None):
    d = discover(root)
    return d.patients[0] if pid is None else next(p for p in d.patients if p.pid == pid)


def test_stored_orientation_does_not_change_slices(tmp_path):
    case = make_case(1, SHAPE)
    write_case(case, tmp_path / "lps", orientation="lps")
    write_case(case, tmp_path / "ras", orientation="ras")
    a = process_patient(_patient(tmp_path / "lps"), PreprocessConfig(size=32))
    b = process_patient(_patient(tmp_path / "ras"), PreprocessConfig(size=32))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.slice_index == b.slice_index


def test_outputs_contract_shapes_and_values(release_2020):
    ps = process_patient(_patient(release_2020), PreprocessConfig(size=32))
    s = len(ps.slice_index)
    assert ps.image.shape == (s, 4, 32, 32) and ps.image.dtype == np.float16
    assert ps.mask.shape == (s, 3, 32, 32) and ps.mask.dtype == np.uint8
    assert set(np.unique(ps.mask)) <= {0, 1} and ps.mask.sum() > 0
    assert np.isfinite(ps.image).all()
    # only slices with brain are kept: every kept slice has nonzero input
    assert all(np.abs(ps.image[i]).sum() > 0 for i in range(s))
    assert ps.sources["t1gd"]["path"].endswith("_t1ce.nii.gz") and len(ps.sources["seg"]["sha256"]) == 64


def test_mask_matches_source_labels_at_native_size(release_2020):
    """No crop, size equal to the volume: masks are exactly the label map's channels."""
    pf = _patient(release_2020)
    ps = process_patient(pf, PreprocessConfig(size=48))
    seg = load_volume(pf.files["seg"]).data[::-1, ::-1, :]  # LPS storage -> RAS
    for i, z in enumerate(ps.slice_index):
        assert np.array_equal(ps.mask[i, 2], seg[:, :, z] == 4)
        assert np.array_equal(ps.mask[i, 1], seg[:, :, z] == 2)


def test_regions_crop_and_tumour_free_fraction(release_2020):
    pf = _patient(release_2020)
    full = process_patient(pf, PreprocessConfig(size=32))
    reg = process_patient(pf, PreprocessConfig(size=32, mask="regions"))
    assert np.array_equal(reg.mask[:, 0], full.mask.max(axis=1))  # WT = union of sub-regions
    crop = process_patient(pf, PreprocessConfig(size=32, crop=True))
    x0, x1, y0, y1 = crop.geometry.crop_box
    assert x1 - x0 == y1 - y0 < 48
    assert crop.mask.sum() > full.mask.sum()  # the tumour covers more pixels after cropping
    few = process_patient(pf, PreprocessConfig(size=32, tumour_free_fraction=0.0))
    seg = load_volume(pf.files["seg"]).data
    tumour_slices = [z for z in full.slice_index if seg[:, :, z].any()]  # judged on the source labels
    assert few.slice_index == tumour_slices


def test_normalisation_volume_and_per_slice(release_2020):
    """At native size: brain voxels have mean 0 / std 1 over the volume (or each slice),
    background stays exactly 0."""
    pf = _patient(release_2020)
    t1 = load_volume(pf.files["t1"]).data[::-1, ::-1, :]
    vol = process_patient(pf, PreprocessConfig(size=48, normalize="volume"))
    sl = process_patient(pf, PreprocessConfig(size=48, normalize="slice"))
    brain = np.stack([t1[:, :, z] != 0 for z in vol.slice_index])  # t1 is nonzero in the brain
    x = vol.image[:, 0].astype(np.float64)
    assert abs(x[brain].mean()) < 2e-3 and abs(x[brain].std() - 1) < 2e-3
    assert np.all(x[~brain] == 0)
    y = sl.image[:, 0].astype(np.float64)
    for i in range(len(sl.slice_index)):
        if brain[i].sum() > 30:
            assert abs(y[i][brain[i]].mean()) < 5e-3 and abs(y[i][brain[i]].std() - 1) < 5e-3
    assert not np.array_equal(vol.image, sl.image)


def _rewrite(path, fn):
    v = load_volume(path)
    save_volume(path, *fn(v.data, v.affine))


def test_nan_in_image_is_cleaned_and_counted(release_copy):
    pf = _patient(release_copy)

    def add_nan(d, a):
        d = d.astype(np.float32)
        d[20:22, 20:22, 10] = np.nan
        return d, a

    _rewrite(pf.files["flair"], add_nan)
    ps = process_patient(pf, PreprocessConfig(size=32))
    assert ps.nonfinite_voxels == 4 and np.isfinite(ps.image).all()


@pytest.mark.parametrize("damage,match", [
    (lambda d, a: (d[:, :, :-1].copy(), a), "has shape"),
    (lambda d, a: (d, a + np.diag([0, 0, 0.0, 0]) + np.array([[0, 0, 0, 5.0]] + [[0] * 4] * 3)), "different affine"),
    (lambda d, a: (np.stack([d, d], -1), a), "4D"),
])
def test_inconsistent_volume_fails_naming_the_file(release_copy, damage, match):
    pf = _patient(release_copy)
    _rewrite(pf.files["t2"], damage)
    with pytest.raises(InputError, match=match) as e:
        process_patient(pf, PreprocessConfig(size=32))
    assert pf.files["t2"].name in str(e.value)


def test_bad_segmentation_labels_and_nan_fail(release_copy):
    pf = _patient(release_copy)
    _rewrite(pf.files["seg"], lambda d, a: (np.where(d == 2, 3, d).astype(np.uint8), a))
    with pytest.raises(InputError, match=r"labels \[3\]"):
        process_patient(pf, PreprocessConfig(size=32))

    def nan_seg(d, a):
        d = d.astype(np.float32)
        d[0, 0, 0] = np.nan
        return d, a

    _rewrite(pf.files["seg"], nan_seg)
    with pytest.raises(InputError, match="NaN"):
        process_patient(pf, PreprocessConfig(size=32))


def test_truncated_file_fails_naming_it(release_copy):
    pf = _patient(release_copy)
    data = pf.files["t1"].read_bytes()
    pf.files["t1"].write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=pf.files["t1"].name):
        process_patient(pf, PreprocessConfig(size=32))
