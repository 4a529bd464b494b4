"""URL credentials are masked in whatever the project stores or prints (shards/redact.py)."""

import pytest
from typer.testing import CliRunner

from cli import app
from shards.redact import redact, redact_tree


@pytest.mark.parametrize("text, secret", [
    ("http://user:hunter2@host/set", "hunter2"),
    ("https://:hunter2@host:8443/a/b", "hunter2"),
    ("https://host/set?token=hunter2&x=1", "hunter2"),
    ("https://host/set?X-Amz-Signature=hunter2&X-Amz-Credential=AKIA%2Fx", "hunter2"),
    ("error: cannot read http://u:hunter2@h/wds/a.tar: HTTP 404 (attempt 1)", "hunter2"),
    ("s3://bucket/set?access_token=hunter2", "hunter2"),
])
def test_secrets_in_urls_are_masked(text, secret):
    out = redact(text)
    assert secret not in out and "***" in out
    assert out.split("://")[0] == text.split("://")[0]  # the rest still says where


@pytest.mark.parametrize("text", ["http://host/set", "/data/shards", "s3://bucket/set?versionId=3",
                                  "http://user@host/set", "a=b c=d"])
def test_text_without_secrets_is_unchanged(text):
    assert redact(text) == text


def test_storage_options_are_masked_by_key_and_value():
    opts = {"endpoint_url": "http://u:hunter2@minio:9000", "key": "AKIA", "secret": "hunter2",
            "client_kwargs": {"aws_session_token": "hunter2", "region_name": "eu"}, "anon": False}
    out = redact_tree(opts)
    assert "hunter2" not in repr(out) and "AKIA" not in repr(out)
    assert out["client_kwargs"]["region_name"] == "eu" and out["anon"] is False


def test_credential_headers_in_storage_options_are_masked():
    opts = {"client_kwargs": {"headers": {"Authorization": "Bearer hunter2", "Cookie": "session=hunter2",
                                          "X-API-Key": "hunter2", "Accept": "application/json"}}}
    out = redact_tree(opts)
    assert "hunter2" not in repr(out)
    assert out["client_kwargs"]["headers"]["Accept"] == "application/json"


def test_an_error_line_never_prints_the_password(tmp_path):
    url = "http://user:hunter2@127.0.0.1:9/set"  # port 9: nothing listens
    r = CliRunner().invoke(app, ["train", url, "--out", str(tmp_path / "run"), "--remote-timeout", "0.5",
                                 "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert r.exit_code == 2, r.output
    assert "hunter2" not in r.stdout + r.stderr and "127.0.0.1" in r.stderr
