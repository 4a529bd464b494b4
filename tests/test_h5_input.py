import json

import numpy as np
import pytest

pytest.importorskip("h5py")

from preprocess.discover import discover  # noqa: E402
from preprocess.h5slices import write_export  # noqa: E402
from preprocess.config import PreprocessConfig  # noqa: E402
from preprocess.synthetic.cases import write_case  # noqa: E402
from preprocess.synthetic.toy import make_case
from preprocess.build import BuildConfig, build  # noqa: E402
from shards.verify import verify  # noqa: E402
from test_show import check_png  # noqa: E402  (tests/ is on sys.path: pytest's rootdir import mode)

SHAPE = (48, 48, 24)


@pytest.fixture(scope="module")
def twin_inputs(tmp_path_factory):
    """The same three cases as the seed's HDF5 slice export and as RAS-stored NIfTI."""
    root = tmp_path_factory.mktemp("h5twins")
    for i in (1, 2, 3):
        case = make_case(i, SHAPE, seed=7)
        write_export(root / "h5", i, np.stack(case.images), case.seg)
        write_case(case, root / "nifti", orientation="ras")
    return root


def test_discovery_finds_volumes_in_slice_order(twin_inputs):
    d = discover(twin_inputs / "h5")
    assert [p.pid for p in d.patients] == ["volume_1", "volume_2", "volume_3"]
    assert d.kind == "h5-slices"
    assert [i for i, _ in d.patients[0].slices] == list(range(SHAPE[2]))


def test_h5_export_builds_the_same_contract_as_nifti(twin_inputs, tmp_path):
    cfg = BuildConfig(preprocess=PreprocessConfig(size=32), val_fraction=0.0)
    mh = build(twin_inputs / "h5", tmp_path / "h5", cfg, workers=0, progress=False).manifest
    mn = build(twin_inputs / "nifti", tmp_path / "nifti", cfg, workers=0, progress=False).manifest
    assert mh["failed"] == [] and verify(tmp_path / "h5") == []
    assert mh["source"]["kind"] == "h5-slices" and "no affine" in mh["source"]["note"]
    import zarr

    for i in (1, 2, 3):
        ph, pn = mh["patients"][f"volume_{i}"], mn["patients"][f"BraTS20_Training_{i:03d}"]
        assert ph["slice_index"] == pn["slice_index"] and ph["label_voxels"] == pn["label_voxels"]
        assert ph["geometry"]["affine_known"] is False and pn["geometry"]["affine_known"] is True
        gh = zarr.open_group(str(tmp_path / "h5" / "zarr" / "train" / f"volume_{i}"), mode="r")
        gn = zarr.open_group(str(tmp_path / "nifti" / "zarr" / "train" / f"BraTS20_Training_{i:03d}"), mode="r")
        assert np.array_equal(gh["mask"][:], gn["mask"][:])
        assert np.array_equal(gh["image"][:], gn["image"][:])
    tars = sorted(f["path"] for f in mh["files"] if f["format"] == "wds")
    assert tars == ["wds/train-volume_1.tar", "wds/train-volume_2.tar", "wds/train-volume_3.tar"]
    assert json.loads((tmp_path / "h5" / "manifest.json").read_text())["patients"]["volume_1"]["sources"]["h5_slices"]["files"] == SHAPE[2]


def test_bad_slice_file_fails_that_volume_only(twin_inputs, tmp_path):
    import shutil

    src = tmp_path / "h5"
    shutil.copytree(twin_inputs / "h5", src)
    (src / "volume_2_slice_5.h5").write_bytes(b"not hdf5")
    m = build(src, tmp_path / "out", BuildConfig(preprocess=PreprocessConfig(size=32)), workers=0,
              progress=False).manifest
    assert [f["patient"] for f in m["failed"]] == ["volume_2"]
    assert "volume_2_slice_5.h5" in m["failed"][0]["reason"]
    assert set(m["patients"]) == {"volume_1", "volume_3"}


def test_show_reads_the_h5_export(twin_inputs, tmp_path):
    from train.show import figures

    paths = figures(twin_inputs / "h5", tmp_path, "volume_2")
    assert [p.name for p in paths] == [f"volume_2_{k}.png" for k in ("modalities", "planes", "overlay", "histograms")] \
        + ["class_balance.png"]
    for p in paths:
        check_png(p)
