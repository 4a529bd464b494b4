"""Names from untrusted text: the bypasses a looser check let through."""

import pytest

from shards.names import patient_id_problem, relpath_problem


@pytest.mark.parametrize("pid", ["P1\n", "P1\r", "P\t1", "P1\x00"])
def test_patient_id_with_a_trailing_or_inner_control_character_is_refused(pid):
    assert patient_id_problem(pid) is not None


@pytest.mark.parametrize("path", ["zarr/%2e%2e/%2e%2e/admin", "wds/a.tar?x=1", "wds/a.tar#frag", "wds/a b.tar",
                                  "wds/a\n.tar", "wds/\u00e9.tar"])
def test_relpath_that_a_url_would_reinterpret_is_refused(path):
    assert relpath_problem(path) is not None


def test_every_path_the_writers_produce_is_accepted():
    for path in ("zarr/zarr.json", "zarr/val/zarr.json", "zarr/train/BraTS-GLI-00001-000/image/c/0/0/0/0",
                 "zarr/train/P.1/mask/zarr.json", "wds/train-BraTS-GLI-00001-000.tar", "wds/val-P.1.tar"):
        assert relpath_problem(path) is None, path
