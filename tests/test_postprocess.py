import time

import numpy as np
import pytest

from train.metrics import dice
from train.postprocess import PostprocessConfig, choose, postprocess

SHAPE = (3, 12, 24, 24)  # [WT, TC, ET] of a stack of 12 slices


def tumour(et_voxels: int = 27, shape=SHAPE) -> np.ndarray:
    """Nested regions: WT a 6x10x10 box, TC a 4x6x6 box inside, ET the first `et_voxels` of a
    3x3x3 cube inside TC (0 for none)."""
    r = np.zeros(shape, bool)
    r[0, 3:9, 5:15, 5:15] = True
    r[1, 4:8, 7:13, 7:13] = True
    cube = np.zeros((3, 3, 3), bool)
    cube.flat[:et_voxels] = True
    r[2, 5:8, 8:11, 8:11] = cube
    return r


def is_nested(r: np.ndarray) -> bool:
    return bool(np.all(r[2] <= r[1]) and np.all(r[1] <= r[0]))


def test_small_et_becomes_ncr_large_kept():
    r = tumour(et_voxels=8)
    out = postprocess(r, PostprocessConfig(et_min_mm3=10))
    assert not out[2].any()  # ET emptied ...
    assert np.array_equal(out[1], r[1]) and np.array_equal(out[0], r[0])  # ... its voxels stay NCR
    for threshold in (8, 5, 0):  # at or above the threshold: kept (strictly smaller is relabelled)
        assert np.array_equal(postprocess(r, PostprocessConfig(et_min_mm3=threshold)), r)


def test_small_components_removed_from_all_regions():
    r = tumour()
    r[:, 10, 20:22, 20:22] = True  # isolated 4-voxel blob, WT = TC = ET
    r[0, 9, 15, 15] = True  # touches the big WT box only at a corner: same 26-connected component
    out = postprocess(r, PostprocessConfig(min_component_mm3=10))
    assert not out[:, 10, 20:22, 20:22].any()
    expected = r.copy()
    expected[:, 10, 20:22, 20:22] = False
    assert np.array_equal(out, expected)
    assert np.array_equal(postprocess(r, PostprocessConfig(min_component_mm3=4)), r)  # 4 mm^3 not < 4


def test_thresholds_are_physical_volumes():
    fine = tumour(et_voxels=0, shape=(3, 16, 16, 16))
    fine[2, 4:8, 4:8, 4:8] = fine[1, 4:8, 4:8, 4:8] = fine[0, 2:12, 2:12, 2:12] = True  # ET 64 mm^3
    coarse = fine[:, ::2, ::2, ::2]  # the same tumour on a 2x2x2 mm grid: ET 8 voxels of 8 mm^3
    assert coarse[2].sum() == 8
    for r, v in ((fine, 1.0), (coarse, 8.0)):
        assert postprocess(r, PostprocessConfig(et_min_mm3=50), v)[2].any()
        assert not postprocess(r, PostprocessConfig(et_min_mm3=100), v)[2].any()
    assert not postprocess(coarse, PostprocessConfig(et_min_mm3=50), 1.0)[2].any()  # as 8 mm^3: dropped
    blob = np.zeros((3, 8, 8, 8), bool)
    blob[0, 1:3, 1:3, 1:3] = True  # 8 voxels
    assert postprocess(blob, PostprocessConfig(min_component_mm3=50), 8.0).any()  # 64 mm^3 kept
    assert not postprocess(blob, PostprocessConfig(min_component_mm3=50), 1.0).any()


def test_output_nested_new_and_input_untouched():
    rng = np.random.default_rng(0)
    r = rng.random(SHAPE) < 0.3  # not nested
    before = r.copy()
    out = postprocess(r, PostprocessConfig(et_min_mm3=5000, min_component_mm3=3))
    assert np.array_equal(r, before)
    assert out.dtype == bool and out.shape == r.shape and is_nested(out) and not np.shares_memory(out, r)
    same = postprocess(before, PostprocessConfig())
    assert is_nested(same) and same is not r


def false_et_cases():
    """6 patients: 4 without true ET whose prediction has a 20-voxel false ET, 2 with a 27-voxel
    true ET predicted exactly."""
    cases = []
    for i in range(6):
        ref = tumour(et_voxels=27 if i < 2 else 0)
        pred = ref.copy()
        if i >= 2:
            pred[2] = tumour(et_voxels=20)[2]
        cases.append((pred, ref, 1.0))
    return cases


def test_choose_picks_et_threshold_when_false_small_et():
    res = choose(false_et_cases(), et_grid=(0, 10, 25, 50))
    assert res["config"] == {"et_min_mm3": 25.0, "min_component_mm3": 0.0}  # smallest that helps, < 27
    assert res["per_region_before"]["ET"] == pytest.approx(2 / 6)
    assert res["per_region_after"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    assert res["dice_after"] == 1.0 > res["dice_before"]
    assert choose(false_et_cases())["config"]["et_min_mm3"] == 50  # default grid: 50 drops the true ETs too, still better


def test_choose_keeps_zero_when_small_true_et():
    cases = [(tumour(20), tumour(20), 1.0) for _ in range(3)] + [(tumour(0), tumour(0), 1.0)]
    res = choose(cases)
    assert res["config"] == PostprocessConfig().to_dict()
    assert res["dice_before"] == res["dice_after"] == 1.0


def test_choose_ties_go_to_smallest():
    ref = tumour()
    pred = ref.copy()
    pred[0, 0, 0, 0:3] = True  # 3-voxel false WT speck, far away
    res = choose([(pred, ref, 1.0)], et_grid=(0, 10), component_grid=(25, 0, 10, 1000))
    assert res["config"] == {"et_min_mm3": 0.0, "min_component_mm3": 10.0}  # 10, 25 tie; 1000 drops all
    perfect = choose([(ref, ref, 1.0)])
    assert perfect["config"] == {"et_min_mm3": 0.0, "min_component_mm3": 0.0}


def test_choose_agrees_with_postprocess():
    rng = np.random.default_rng(1)
    cases = []
    for _ in range(4):
        ref = tumour(int(rng.integers(0, 28)))
        pred = ref ^ (rng.random(SHAPE) < 0.01)  # noise: specks, holes, stray ET
        cases.append((pred, ref, float(rng.choice([1.0, 2.0]))))
    res = choose(cases, et_grid=(0, 20, 60), component_grid=(0, 2, 4))
    cfg = PostprocessConfig.from_dict(res["config"])
    direct = [[dice(p, r) for p, r in zip(postprocess(pred, cfg, v), ref)]
              for pred, ref, v in cases]
    assert res["per_region_after"] == pytest.approx(dict(zip("WT TC ET".split(), np.mean(direct, 0))))
    assert res["dice_after"] >= res["dice_before"]


def test_choose_is_fast():
    rng = np.random.default_rng(2)
    ref = np.zeros((3, 100, 96, 96), bool)
    ref[0, 30:70, 20:70, 20:70] = ref[1, 40:60, 30:60, 30:60] = True
    ref[2, 45:55, 35:55, 35:55] = True
    cases = [(ref ^ (rng.random(ref.shape) < 0.002), ref, 1.0) for _ in range(10)]
    t = time.perf_counter()
    choose(cases)  # 48 grid points
    assert time.perf_counter() - t < 4.0  # ~0.5 s on a shared 2-core machine


def test_config_validation_and_dict():
    for bad in ({"et_min_mm3": -1}, {"min_component_mm3": -0.5}, {"et_min_mm3": float("nan")},
                {"et_min_mm3": "100"}):
        with pytest.raises(ValueError, match="mm\\^3"):
            PostprocessConfig(**bad)
    cfg = PostprocessConfig(et_min_mm3=200, min_component_mm3=25)
    assert PostprocessConfig.from_dict({**cfg.to_dict(), "added_later": 1}) == cfg
    assert cfg.to_dict() == {"et_min_mm3": 200.0, "min_component_mm3": 25.0}
    assert all(type(v) is float for v in cfg.to_dict().values())  # JSON-stable in the checkpoint
    with pytest.raises(ValueError, match="voxel_mm3"):
        postprocess(tumour(), cfg, voxel_mm3=0)
