"""The realistic generator: deterministic, BraTS-shaped, and hard in the ways real cases are."""

from __future__ import annotations

import csv
import functools
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

from preprocess.nifti import load_volume
from preprocess.synthetic.acquisition import thick_slices as _thick_slices
from preprocess.synthetic.anatomy import voxel_volume_mm3
from preprocess.synthetic.realistic import _realistic_case_with_truth, make_realistic_case, make_realistic_data
from preprocess.synthetic.tumour import VOLUME_RANGES_CM3, volume_ranges_voxels

SMALL = (96, 96, 64)  # 2.5 mm voxels: the BraTS field of view at a fast size
N_CASES = 20


@functools.lru_cache(maxsize=None)
def _case(i: int, shape=SMALL, release="2020", seed=0):
    return _realistic_case_with_truth(i, shape, release=release, seed=seed)


def _cases(n=N_CASES):
    return [_case(i) for i in range(n)]


def test_same_seed_same_bytes_whatever_was_generated_before():
    a = make_realistic_case(3, SMALL, seed=5)
    make_realistic_case(4, SMALL, seed=5)  # no state leaks from one case to the next
    b = make_realistic_case(3, SMALL, seed=5)
    c = make_realistic_case(3, SMALL, seed=6)
    assert a.pid == b.pid == "BraTS20_Training_003"
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a.images, b.images))
    assert a.seg.tobytes() == b.seg.tobytes()
    assert not np.array_equal(a.images[0], c.images[0])
    assert all(im.dtype == np.int16 and im.shape == SMALL for im in a.images)
    assert a.seg.dtype == np.uint8 and a.seg.shape == SMALL


@pytest.mark.parametrize("release,labels", [("2020", {0, 1, 2, 4}), ("2023", {0, 1, 2, 3})])
def test_labels_follow_the_release(release, labels):
    segs = [make_realistic_case(i, (64, 64, 40), release=release).seg for i in range(8)]
    found = set(np.unique(np.concatenate([s.ravel() for s in segs])).tolist())
    assert found == labels


def test_skull_stripped_zero_background_and_nonzero_brain_in_every_modality():
    for case, truth in _cases(6):
        brain = truth.brain
        assert 0.05 < brain.mean() < 0.6
        for im in case.images:
            assert np.all(im[~brain] == 0)
            assert np.all(im[brain] > 0)
        assert np.all(case.seg[~brain] == 0)


def _volumes_cm3(labels, et_label, shape):
    v = voxel_volume_mm3(shape) / 1000.0
    return {"WT": (labels > 0).sum() * v, "TC": np.isin(labels, (1, et_label)).sum() * v,
            "ET": (labels == et_label).sum() * v, "ED": (labels == 2).sum() * v}


def test_sub_region_volumes_within_the_documented_ranges():
    ranges = volume_ranges_voxels(SMALL)
    scale = voxel_volume_mm3(SMALL) / 1000.0
    assert ranges["WT"][0] * scale == pytest.approx(VOLUME_RANGES_CM3["WT"][0])
    wt, tc_share, ncr_share, enhancing = [], [], [], []
    for case, truth in _cases():
        true = _volumes_cm3(truth.labels, 4, SMALL)
        drawn = _volumes_cm3(case.seg, 4, SMALL)
        for k, (lo, hi) in VOLUME_RANGES_CM3.items():
            # true regions: as sampled (a little less where the brain or the box cuts them)
            assert 0.75 * lo <= true[k] <= 1.05 * hi, (k, true[k])
            # the rater's: the same within a voxel or two of boundary
            assert 0.5 * lo <= drawn[k] <= 1.5 * hi, (k, drawn[k])
        wt.append(true["WT"])
        tc_share.append(true["TC"] / true["WT"])
        ncr = (truth.labels == 1).sum()
        ncr_share.append(ncr / max(np.isin(truth.labels, (1, 4)).sum(), 1))
        enhancing.append(true["ET"] > 0)
    assert 40 < np.median(wt) < 200 and max(wt) > 4 * min(wt)  # small to large tumours
    assert 0.1 < min(tc_share) and max(tc_share) < 0.8 and max(tc_share) - min(tc_share) > 0.25
    assert min(ncr_share) < 0.1 and max(ncr_share) > 0.4  # necrosis from absent to large
    assert sum(enhancing) >= N_CASES * 0.7


def test_some_tumours_have_more_than_one_focus_or_a_broken_rim():
    multi = 0
    broken = 0
    for case, truth in [_case(i) for i in range(30)]:
        _, n = ndi.label(truth.labels > 0)
        multi += n > 1
        et = truth.labels == 4
        core = np.isin(truth.labels, (1, 4))
        rim = core & ~ndi.binary_erosion(core)
        broken += et.any() and (rim & (truth.labels == 1)).sum() > 0.1 * rim.sum()
    assert multi >= 1
    assert broken >= 3


def test_oedema_spreads_along_white_matter():
    """WM share under the oedema beats the brain's and an isotropic shell of the same volume."""
    ed_wm, shell_wm, brain_wm = [], [], []
    for case, truth in _cases(12):
        ed = truth.labels == 2
        core = np.isin(truth.labels, (1, 4))
        if ed.sum() < 20:
            continue
        dist = ndi.distance_transform_edt(~core)
        cand = truth.brain & ~core
        t = np.sort(dist[cand])[ed.sum()]
        shell = cand & (dist < t)
        ed_wm.append(truth.wm[ed].mean())
        shell_wm.append(truth.wm[shell].mean())
        brain_wm.append(truth.wm[truth.brain].mean())
    assert len(ed_wm) >= 8
    assert np.mean(ed_wm) > np.mean(shell_wm) + 0.05
    assert np.mean(ed_wm) > np.mean(brain_wm) + 0.15


def test_tissue_contrast_differs_between_cases_not_only_in_scale():
    ratios = []
    for case, truth in _cases(10):
        healthy = (case.seg == 0) & ~np.any(list(truth.confounders.values()), axis=0)
        wm = healthy & (truth.wm > 0.9)
        gm = healthy & (truth.gm > 0.8)
        t1 = case.images[0].astype(float)
        ratios.append(t1[wm].mean() / t1[gm].mean())
    ratios = np.array(ratios)
    assert np.all(ratios > 1.0)  # T1: white matter brighter than grey matter, always
    assert ratios.max() - ratios.min() > 0.1 and ratios.std() / ratios.mean() > 0.03


def test_enhancement_ranges_from_faint_to_strong():
    rel = []
    for case, truth in _cases():
        et = (truth.labels == 4) & (case.seg == 4)
        if et.sum() < 10:
            continue
        t1gd = case.images[1].astype(float)
        wm = (case.seg == 0) & (truth.wm > 0.9)
        rel.append(np.median(t1gd[et]) / np.median(t1gd[wm]))
    assert len(rel) >= 10
    assert min(rel) < 1.3 and max(rel) > 1.6
    assert all(r > 1.0 for r in rel)


def test_segmentation_is_a_raters_not_the_image_truth():
    for case, truth in _cases(10):
        true_wt, drawn_wt = truth.labels > 0, case.seg > 0
        dice = 2 * (true_wt & drawn_wt).sum() / (true_wt.sum() + drawn_wt.sum())
        assert 0.6 < dice < 0.995, dice
        # the disagreement sits at the boundary: within ~2 voxels (5 mm here) of the true outline
        differ = true_wt ^ drawn_wt
        to_edge = np.minimum(ndi.distance_transform_edt(true_wt), ndi.distance_transform_edt(~true_wt))
        assert np.percentile(to_edge[differ], 95) <= 2.5
        # inner boundaries move too
        true_tc, drawn_tc = np.isin(truth.labels, (1, 4)), np.isin(case.seg, (1, 4))
        assert (true_tc ^ drawn_tc).any()


def test_confounders_look_like_tumour_in_one_modality_but_are_label_0():
    bright_t1gd = bright_flair = 0
    for case, truth in _cases():
        t1gd, flair = case.images[1].astype(float), case.images[3].astype(float)
        wt = ndi.binary_dilation(case.seg > 0, iterations=2)
        wm = (case.seg == 0) & (truth.wm > 0.9) & ~truth.confounders["wml"]
        for name in ("plexus", "vessel"):
            mask = truth.confounders[name] & ~wt
            if mask.sum() >= 3:
                assert np.all(case.seg[mask] == 0)
                bright_t1gd += np.median(t1gd[mask]) > 1.25 * np.median(t1gd[wm])
        mask = truth.confounders["wml"] & ~wt
        if mask.sum() >= 3:
            assert np.all(case.seg[mask] == 0)
            bright_flair += flair[mask].mean() > 1.1 * np.median(flair[wm])
    assert bright_t1gd >= 3
    assert bright_flair >= 2


def test_thick_slices_blur_along_one_axis_only():
    rng = np.random.default_rng(0)
    img = rng.random((20, 20, 40)).astype(np.float32)
    out = _thick_slices(img, axis=2, k=4.0, phase=1.0)
    assert out.shape == img.shape
    assert np.abs(np.diff(out, axis=2)).mean() < 0.3 * np.abs(np.diff(img, axis=2)).mean()
    assert np.abs(np.diff(out, axis=0)).mean() > 0.3 * np.abs(np.diff(img, axis=0)).mean()


def test_writes_the_brats_layout_and_name_mapping(tmp_path):
    ids = make_realistic_data(tmp_path, 2, shape=(64, 64, 40), release="2023", start=4)
    assert ids == ["BraTS-GLI-00004-000", "BraTS-GLI-00005-000"]
    files = sorted(p.name for p in (tmp_path / ids[0]).iterdir())
    assert files == [f"{ids[0]}-{m}.nii.gz" for m in ("seg", "t1c", "t1n", "t2f", "t2w")]
    v = load_volume(tmp_path / ids[0] / f"{ids[0]}-t1n.nii.gz")
    assert v.data.dtype == np.int16 and v.data.shape == (64, 64, 40)
    assert v.affine[0, 0] == -1 and v.affine[1, 1] == -1  # LPS storage, as BraTS ships
    case = make_realistic_case(4, (64, 64, 40), release="2023")
    assert np.array_equal(v.data, case.images[0][::-1, ::-1, :])
    with open(tmp_path / "name_mapping.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Grade", "BraTS_ID"]
    assert [r[1] for r in rows[1:]] == ids and {r[0] for r in rows[1:]} <= {"HGG", "LGG"}
    with pytest.raises(ValueError):
        make_realistic_data(tmp_path / "unknown", 1, shape=(64, 64, 40), release="no-such-release")
    assert not (tmp_path / "unknown").exists()
    # BraTS 2018, 2019 and 2021 ship the 2020 file names and labels: the name writes that layout
    ids_2019 = make_realistic_data(tmp_path / "2019", 1, shape=(64, 64, 40), release="2019")
    assert ids_2019 == make_realistic_data(tmp_path / "2020", 1, shape=(64, 64, 40), release="2020")
    assert sorted(p.name for p in (tmp_path / "2019" / ids_2019[0]).iterdir()) == \
        sorted(p.name for p in (tmp_path / "2020" / ids_2019[0]).iterdir())


def test_template_loads_without_the_network():
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse; socket.getaddrinfo = refuse\n"
        "from preprocess.synthetic.anatomy import template_1mm\n"
        "t = template_1mm(); print(t.t1.shape, float(t.wm.max()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "network used" not in r.stderr


@pytest.mark.parametrize("release", ["gli-2024", "met"])
def test_post_treatment_cases_have_a_resection_cavity_inside_residual_tumour(release):
    """Every case holds a resection cavity (RC, 4) where the core was: enclosed by tumour labels
    (the residual rim and oedema), dark on T1 and T1Gd and bright on T2 against white matter."""
    rel_rc = 4
    for i in range(4):
        case, truth = _case(i, release=release)
        rc = truth.labels == rel_rc
        assert rc.sum() > 50, (release, i)
        ring = ndi.binary_dilation(rc, iterations=2) & ~rc & truth.brain
        assert np.isin(truth.labels[ring], (1, 2, 3, rel_rc)).mean() > 0.7  # mostly tumour around the cavity
        inner = ndi.binary_erosion(rc)  # away from partial volume
        wm = (truth.wm > 0.9) & (truth.labels == 0)
        t1, t1gd, t2 = (np.median(case.images[k][inner]) / np.median(case.images[k][wm]) for k in (0, 1, 2))
        assert t1 < 0.7 and t1gd < 0.8 and t2 > 1.4, (release, i, t1, t1gd, t2)
        assert (case.seg == rel_rc).any() and set(np.unique(case.seg)) <= {0, 1, 2, 3, 4}


def test_paediatric_cases_have_the_ped_2024_labels_with_a_cyst():
    """PED 2024 labels: 1 ET, 2 NETC, 3 CC (cyst), 4 ED; every case has its cyst, at the core's
    edge, bright on T2; the same tumour in 2023 labels maps label for label."""
    for i in range(3):
        case, truth = _case(i, release="ped-2024")
        cc = case.seg == 3
        assert cc.sum() > 5 and (case.seg == 4).sum() > (case.seg == 2).sum()  # oedema (ED) the largest
        wm = (truth.wm > 0.9) & (truth.labels == 0)
        assert np.median(case.images[2][ndi.binary_erosion(cc) | cc]) > 1.3 * np.median(case.images[2][wm])
        glioma = _case(i, release="2023")[0].seg  # same draws: the same oedema and core
        assert np.array_equal(case.seg == 4, glioma == 2)  # the cyst is carved from the core only
        assert np.array_equal(np.isin(case.seg, (1, 2, 3)), np.isin(glioma, (1, 3)))
        assert not (case.seg == 1)[glioma != 3].any()


def test_men_rt_is_t1gd_alone_with_a_gtv():
    """MEN-RT: one image (T1Gd) and one label, the gross tumour volume: the core, without oedema."""
    case, truth = _case(1, release="men-rt")
    glioma = _case(1, release="2023")[0]
    assert len(case.images) == 1 and np.array_equal(case.images[0], glioma.images[1])  # the T1Gd
    assert set(np.unique(case.seg)) == {0, 1}
    assert np.array_equal(case.seg == 1, np.isin(glioma.seg, (1, 3)))
