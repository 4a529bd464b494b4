import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from preprocess.discover import discover
from preprocess.nifti import load_volume
from preprocess.config import PreprocessConfig
from preprocess.pipeline import process_patient
from preprocess.synthetic.cases import write_case
from preprocess.synthetic.toy import make_case
from shards.domain import RELEASES, to_labels
from train.evaluate import patient_metrics
from train.loop import TrainConfig, train
from train.predict import THRESHOLD, predict

REPO = Path(__file__).resolve().parents[1]
SHAPE = (96, 80, 32)  # not square: catches swapped axes


def back_to_labels(ps, prob, mode, rel):
    """Slice probabilities -> a label map on the source volume, as `predict` does."""
    return to_labels(ps.geometry.inverse(prob, ps.slice_index) > THRESHOLD, mode, rel)


@pytest.mark.parametrize("orientation", ["lps", "ras"])
@pytest.mark.parametrize("release,et", [("2020", 4), ("2023", 3)])
def test_truth_mapped_back_equals_the_source(tmp_path, orientation, release, et):
    """Ground-truth channels sent through the way back give the stored segmentation exactly
    (native size, no crop) and closely (crop + resize), in the input's shape and affine."""
    case = make_case(5, SHAPE, release=release)  # a case with necrosis, enhancement and oedema
    write_case(case, tmp_path, release=release, orientation=orientation)
    pf = discover(tmp_path).patients[0]
    stored = load_volume(pf.files["seg"])
    for cfg in (PreprocessConfig(size=64), PreprocessConfig(size=48, crop=True)):
        ps = process_patient(pf, cfg)
        prob = ps.mask.astype(np.float32)
        back = back_to_labels(ps, prob, "subregions", RELEASES[release])
        assert back.shape == stored.data.shape and back.dtype == np.uint8
        assert set(np.unique(back)) == {0, 1, 2, et}
        m = patient_metrics(back, stored.data, (1, 1, 1), RELEASES[release])
        # only the resize loses detail (measured: Dice 0.88-0.97)
        assert m["dice_WT"] > 0.93 and m["dice_TC"] > 0.85 and m["dice_ET"] > 0.83, m


def test_exact_inverse_at_native_size(tmp_path):
    case = make_case(3, (40, 40, 16))
    write_case(case, tmp_path, orientation="lps")
    pf = discover(tmp_path).patients[0]
    stored = load_volume(pf.files["seg"]).data
    ps = process_patient(pf, PreprocessConfig(size=40))
    back = back_to_labels(ps, ps.mask.astype(np.float32), "subregions", RELEASES["2020"])
    assert np.array_equal(back, stored)
    reg = process_patient(pf, PreprocessConfig(size=40, mask="regions"))
    back = back_to_labels(reg, reg.mask.astype(np.float32), "regions", RELEASES["2020"])
    assert np.array_equal(back, stored)


def test_label_rule():
    p = np.zeros((3, 4))
    p[:, 0] = [0.9, 0.9, 0.9]  # all channels: ET wins
    p[:, 1] = [0.9, 0.9, 0.1]  # NCR and ED: NCR wins
    p[:, 2] = [0.1, 0.9, 0.1]  # ED only
    assert to_labels(p > THRESHOLD, "subregions", RELEASES["2020"]).tolist() == [4, 1, 2, 0]
    r = np.zeros((3, 4))
    r[:, 0] = [0.9, 0.9, 0.9]  # WT, TC, ET: enhancing
    r[:, 1] = [0.9, 0.9, 0.1]  # core, not enhancing: NCR/NET
    r[:, 2] = [0.9, 0.1, 0.1]  # whole tumour only: oedema
    assert to_labels(r > THRESHOLD, "regions", RELEASES["2023"]).tolist() == [3, 1, 2, 0]


@pytest.fixture(scope="module")
def checkpoint(shard_set, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(str(shard_set), run, TrainConfig(base_channels=4, depth=2, batch_size=8, num_workers=0, epochs=1),
          progress=False)
    return run / "checkpoints" / "last.pt"


def test_predict_writes_input_geometry_without_segmentations(checkpoint, release_copy, tmp_path):
    pids = [p.pid for p in discover(release_copy).patients]
    for pid in pids:
        (release_copy / pid / f"{pid}_seg.nii.gz").unlink()  # a validation release: no labels
    (release_copy / pids[1] / f"{pids[1]}_t2.nii.gz").unlink()
    r = predict(checkpoint, release_copy, tmp_path / "pred", tta=True, progress=False)
    assert list(r["failed"]) == [pids[1]] and "missing t2" in r["failed"][pids[1]]
    assert len(r["written"]) == len(pids) - 1
    for pid in pids[:1] + pids[2:]:
        out = load_volume(tmp_path / "pred" / f"{pid}.nii.gz")
        src = load_volume(release_copy / pid / f"{pid}_t1.nii.gz")
        assert out.data.shape == src.data.shape and out.data.dtype == np.uint8
        assert np.allclose(out.affine, src.affine)
        assert set(np.unique(out.data)) <= {0, 1, 2, 4}


def test_predict_cli(checkpoint, release_2023, tmp_path):
    r = subprocess.run([sys.executable, "cli.py", "predict", str(checkpoint), str(release_2023), str(tmp_path / "p"),
                        "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "3 prediction(s) written, 0 failed" in r.stdout
    out = load_volume(next((tmp_path / "p").glob("*.nii.gz")))
    assert set(np.unique(out.data)) <= {0, 1, 2, 3}  # the 2023 release's labels
