"""The geometry record: stored form round trip, refusal of bad records, and the way there and back."""

import itertools
import json

import numpy as np
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from preprocess.geometry import (Geometry, affine_problem, apply_ornt, canonical_affine, canonical_ornt, invert_ornt,
                                 spacing_of)
from preprocess.synthetic.cases import lps_affine, ras_affine

SHAPE = (12, 10, 7)  # not cubic: catches swapped axes
# storage axis 0 runs anterior, 1 superior, 2 towards the left; voxels 1 x 2 x 1.5 mm
SWAPPED = np.array([[0, 0, -1.5, 9.0], [1.0, 0, 0, -4.0], [0, 2.0, 0, 3.0], [0, 0, 0, 1]])
AFFINES = {"lps": lps_affine(SHAPE), "ras": ras_affine(SHAPE), "swapped": SWAPPED}
KEYS = ["affine", "source_shape", "ornt", "canonical_shape", "crop_box", "spacing", "labels", "convention",
        "affine_known"]


def _geometry(kind: str, crop: bool = True) -> Geometry:
    geo = Geometry.of_source(AFFINES[kind], SHAPE, "2020")
    if crop:  # a square box inside every canonical plane of SHAPE's orientations (the smallest side is 7)
        geo = geo.cropped((1, 6, 2, 7))
    return geo


def test_spacing_is_the_affine_column_norms():
    assert spacing_of(SWAPPED) == (1.0, 2.0, 1.5)
    assert _geometry("swapped").spacing == (1.0, 2.0, 1.5)


@pytest.mark.parametrize("perm,flips", [(p, f) for p in itertools.permutations(range(3))
                                        for f in ((1, 1, 1), (-1, -1, 1), (-1, 1, -1))])
def test_orientation_matches_nibabel_and_inverts(perm, flips):
    ornt = np.array([[perm[i], flips[i]] for i in range(3)], float)
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    out = apply_ornt(arr, ornt)
    assert np.array_equal(out, apply_orientation(arr, ornt))
    assert np.array_equal(invert_ornt(out, ornt), arr)
    stacked = np.stack([arr, arr + 100])  # leading channel axis is carried along
    assert np.array_equal(apply_ornt(stacked, ornt)[1], out + 100)


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _test_affines() -> list[np.ndarray]:
    """Axis-aligned ones (every permutation and flip, anisotropic voxels), oblique ones, sheared
    ones, ties (45 degrees) and a zero column (rank 2)."""
    rng = np.random.default_rng(7)
    out = list(AFFINES.values())
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((1, -1), repeat=3):
            m = np.eye(4)
            m[:3, :3] = np.eye(3)[:, perm] * flips * [0.9, 1.2, 3.0]
            out.append(m)
    for _ in range(60):
        m = np.eye(4)
        m[:3, :3] = _rotation(rng) * rng.uniform(0.2, 4.0, 3)
        m[:3, 3] = rng.normal(0, 50, 3)
        out.append(m)
        sheared = m.copy()
        sheared[:3, :3] = sheared[:3, :3] @ (np.eye(3) + np.triu(rng.normal(0, 0.3, (3, 3)), 1))
        out.append(sheared)
    c = np.sqrt(0.5)
    out.append(np.array([[c, -c, 0, 0], [c, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]))
    out.append(np.array([[c, c, 0, 0], [c, -c, 0, 0], [0, 0, -2, 0], [0, 0, 0, 1.0]]))
    out.append(np.diag([1.0, 0.0, 2.0, 1.0]))
    return out


def test_orientation_of_an_affine_is_nibabels():
    """canonical_ornt is nibabel's io_orientation (and canonical_affine its inv_ornt_aff) without
    nibabel, on axis-aligned, oblique, sheared, tied and rank-deficient affines."""
    for affine in _test_affines():
        ours, theirs = canonical_ornt(affine), io_orientation(affine)
        assert np.array_equal(ours, theirs, equal_nan=True), (affine, ours, theirs)
        if not np.isnan(ours).any():
            shape = (12, 10, 7)
            assert np.array_equal(canonical_affine(affine, ours, shape), affine @ inv_ornt_aff(theirs, shape))


def test_affine_problem_names_nan_and_singular_affines():
    assert affine_problem(SWAPPED) is None
    assert "NaN/Inf" in affine_problem(np.where(np.eye(4) > 0, np.nan, 0.0))
    assert "singular" in affine_problem(np.diag([1.0, 0.0, 2.0, 1.0]))
    parallel = np.eye(4)
    parallel[:3, 1] = parallel[:3, 0]
    assert "singular" in affine_problem(parallel)


@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_to_dict_from_dict_round_trip(kind):
    geo = _geometry(kind)
    d = geo.to_dict()
    assert list(d) == KEYS  # the key order of the stored bytes
    assert d["canonical_shape"] == list(apply_orientation(np.zeros(SHAPE), geo.ornt_array).shape)
    back = Geometry.from_dict(json.loads(json.dumps(d)))  # through JSON, as the manifest stores it
    assert back == geo and back.to_dict() == d
    assert json.dumps(back.to_dict()) == json.dumps(d)


def test_the_stored_record_is_plain_json_types():
    d = _geometry("lps").to_dict()
    assert all(type(v) is float for row in d["affine"] for v in row)
    assert all(type(v) is int for k in ("source_shape", "canonical_shape", "crop_box", "labels") for v in d[k])
    assert all(type(v) is int for row in d["ornt"] for v in row)
    assert d["labels"] == [0, 1, 2, 4] and d["convention"] == "2020" and d["affine_known"] is True


@pytest.mark.parametrize("change,message", [
    ({"affine": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}, "4x4"),
    ({"affine": [[float("nan")] * 4] * 4}, "finite"),
    ({"source_shape": [12, 10]}, "source_shape"),
    ({"source_shape": [12, 10, "7"]}, "source_shape"),
    ({"ornt": [[0, 1], [0, 1], [2, 1]]}, "ornt"),
    ({"ornt": [[0, 1], [1, 0], [2, 1]]}, "ornt"),
    ({"canonical_shape": [10, 12, 7]}, "canonical_shape"),
    ({"crop_box": [0, 13, 0, 10]}, "crop_box"),
    ({"crop_box": [5, 5, 0, 10]}, "crop_box"),
    ({"spacing": [1.0, 1.0, 2.0]}, "spacing"),
    ({"spacing": ["1", 1.0, 1.0]}, "spacing"),
    ({"convention": "1999"}, "convention"),
    ({"affine_known": "yes"}, "affine_known"),
    ({"labels": [0, 1, 2.5]}, "labels"),
    ({"labels": []}, "labels"),
    ({"convention": ["2020"]}, "convention"),
    ({"extra": 1}, "unknown"),
])
def test_from_dict_refuses_bad_records(change, message):
    d = dict(_geometry("ras", crop=False).to_dict(), **change)
    with pytest.raises(ValueError, match=message):
        Geometry.from_dict(d)


def test_from_dict_refuses_missing_keys_and_non_mappings():
    d = _geometry("ras").to_dict()
    del d["ornt"]
    with pytest.raises(ValueError, match="missing"):
        Geometry.from_dict(d)
    with pytest.raises(ValueError, match="mapping"):
        Geometry.from_dict([1, 2])


def _kept_in_source(geo: Geometry, slice_index) -> np.ndarray:
    """Bool (X, Y, Z) in storage order: the voxels inside the box on kept slices, found with
    nibabel's reorientation of an index volume (independent of the code under test)."""
    idx = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    canon = apply_orientation(idx, geo.ornt_array)
    x0, x1, y0, y1 = geo.crop_box
    keep = np.zeros(SHAPE, bool).ravel()
    keep[canon[x0:x1, y0:y1][:, :, slice_index].ravel()] = True
    return keep.reshape(SHAPE)


@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_forward_then_inverse_returns_the_source_voxels(kind):
    """At the box's own size the resize is the identity, so the way back gives every voxel inside
    the box on the kept slices exactly, and zeros elsewhere."""
    geo = _geometry(kind)
    slice_index = [1, 2, 4]
    rng = np.random.default_rng(0)
    vol = rng.integers(1, 1000, SHAPE).astype(np.float32)
    labels = rng.choice(np.array([1, 2, 4], np.uint8), SHAPE)
    keep = _kept_in_source(geo, slice_index)
    side = geo.crop_box[1] - geo.crop_box[0]

    slices = geo.forward(vol, slice_index, side)  # (S, side, side)
    assert slices.shape == (3, side, side) and slices.dtype == np.float32
    back = geo.inverse(slices[:, None], slice_index)  # (1, X, Y, Z)
    assert back.shape == (1,) + SHAPE
    assert np.array_equal(back[0], np.where(keep, vol, 0))

    lab = geo.forward(labels, slice_index, side, labels=True)
    assert lab.dtype == np.uint8
    back = geo.inverse(lab[:, None].astype(np.float32), slice_index)[0]
    assert np.array_equal(back, np.where(keep, labels, 0))


def test_inverse_of_a_resized_patient_has_the_source_shape():
    geo = _geometry("swapped")
    small = np.ones((2, 3, 16, 16), np.float32)  # 3 channels, resized to 16 x 16
    back = geo.inverse(small, [0, 3])
    assert back.shape == (3,) + SHAPE
    assert np.array_equal(back[0] > 0, _kept_in_source(geo, [0, 3]))


@pytest.mark.parametrize("orientation", ["lps", "ras"])
def test_a_processed_patient_stores_the_record_as_before(tmp_path, orientation):
    """The record of a real patient is the dict the recipe wrote before Geometry existed (same
    values, types and key order: the shard sets' bytes depend on it)."""
    from preprocess.discover import discover
    from preprocess.config import PreprocessConfig
    from preprocess.pipeline import process_patient
    from preprocess.synthetic.cases import write_case
    from preprocess.synthetic.toy import make_case

    write_case(make_case(2, (40, 36, 12)), tmp_path, orientation=orientation)
    pf = discover(tmp_path).patients[0]
    ps = process_patient(pf, PreprocessConfig(size=16, crop=True))
    geo = ps.geometry
    assert isinstance(geo, Geometry)
    affine, flip = {"lps": (lps_affine, -1), "ras": (ras_affine, 1)}[orientation]
    before = {"affine": affine((40, 36, 12)).tolist(), "source_shape": [40, 36, 12],
              "ornt": [[0, flip], [1, flip], [2, 1]], "canonical_shape": [40, 36, 12], "crop_box": list(geo.crop_box),
              "spacing": [1.0, 1.0, 1.0], "labels": [0, 1, 2, 4], "convention": "2020", "affine_known": True}
    assert json.dumps(geo.to_dict()) == json.dumps(before)
