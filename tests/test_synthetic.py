import numpy as np
import pytest

from preprocess.nifti import load_volume
from preprocess.synthetic.toy import make_case, make_demo_data

SHAPE = (48, 48, 24)


def test_same_seed_same_case_other_seed_other_case():
    a, b, c = make_case(3, SHAPE, seed=5), make_case(3, SHAPE, seed=5), make_case(3, SHAPE, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert np.array_equal(a.seg, b.seg)
    assert not np.array_equal(a.images[0], c.images[0])


@pytest.mark.parametrize("release,labels", [("2020", {0, 1, 2, 4}), ("2023", {0, 1, 2, 3})])
def test_labels_follow_the_release(release, labels):
    segs = [make_case(i, SHAPE, release=release).seg for i in range(6)]
    found = set(np.unique(np.concatenate([s.ravel() for s in segs])).tolist())
    assert found == labels


def test_modality_contrast_is_learnable():
    """Enhancing tumour is bright on T1Gd, oedema bright on FLAIR, relative to white matter."""
    for i in range(8):
        c = make_case(i, (64, 64, 40))
        t1, t1gd, t2, flair = (im.astype(float) for im in c.images)
        brain = c.images[0] > 0
        healthy = brain & (c.seg == 0)
        if (c.seg == 4).sum() > 20:
            assert t1gd[c.seg == 4].mean() > 1.3 * t1gd[healthy].mean()
        assert flair[c.seg == 2].mean() > 1.3 * flair[healthy].mean()
        assert np.all(c.images[0][~brain] == 0)  # skull-stripped: background exactly 0


def test_cases_vary_some_without_necrosis_or_enhancement():
    cases = [make_case(i, (32, 32, 16)) for i in range(40)]
    has_ncr = [bool((c.seg == 1).any()) for c in cases]
    has_et = [bool((c.seg == 4).any()) for c in cases]
    sizes = [int((c.seg > 0).sum()) for c in cases]
    assert not all(has_et) and any(has_et)
    assert not all(has_ncr) and any(has_ncr)
    assert max(sizes) > 2 * min(sizes)


def test_written_layout_dtype_and_affine(tmp_path):
    ids = make_demo_data(tmp_path, 2, shape=SHAPE, release="2023")
    assert ids == ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]
    files = sorted(p.name for p in (tmp_path / ids[0]).iterdir())
    assert files == [f"{ids[0]}-{m}.nii.gz" for m in ("seg", "t1c", "t1n", "t2f", "t2w")]
    v = load_volume(tmp_path / ids[0] / f"{ids[0]}-t1n.nii.gz")
    assert v.data.dtype == np.int16 and v.data.shape == SHAPE
    assert v.affine[0, 0] == -1 and v.affine[1, 1] == -1  # LPS-style storage, as BraTS ships
    assert (tmp_path / "name_mapping.csv").exists()


def test_realistic_cases_of_every_release_in_its_layout_and_labels(tmp_path):
    """make-demo-data --kind realistic (the default) writes every release of the table in its own
    layout, modalities and labels, and discovery reads each back as that release."""
    from cli_run import cli

    from preprocess.discover import discover
    from shards.domain import RELEASES

    for name, rel in RELEASES.items():
        out = tmp_path / name
        code, _, err, exc = cli("make-demo-data", out, "--release", name, "--patients", "2", "--shape", "48,48,32")
        assert code == 0 and exc is None, (name, err, exc)
        found = discover(out, need_seg=True, release=None if rel.detect else name)
        assert [p.release.name for p in found.patients] == [name, name], name
        for p in found.patients:
            expected = {"4d", "seg"} if rel.layout == "msd" else {*rel.modalities, "seg"}  # MSD: one 4-D file
            assert set(p.files) == expected, (name, p.files)
            values = set(np.unique(load_volume(p.files["seg"]).data).tolist())
            assert values <= set(rel.label_values) and len(values) > 1, (name, values)
        assert (out / "imagesTr").is_dir() == (rel.layout == "msd")
