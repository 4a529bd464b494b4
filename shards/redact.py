"""Credentials never leave the process: what is stored or printed of a URL has its secrets masked.

A shard set's location may carry a password (`https://user:secret@host/set`) or a token in the
query string (`...?token=abc`, an S3 presigned `X-Amz-Signature=...`). Every place that stores or
prints a location (config.json, checkpoints, TensorBoard, MLflow, error lines) passes it through
`redact` first; the unmasked URL is used only to fetch.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@host  ->  scheme://user:***@host (the user name stays: it says whose)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^\s/@:?#]*):(?P<pw>[^\s/@?#]*)@")
# a password given without a user name is still a password: scheme://:pw@host
# query-string parameters whose name says they are a secret
_SECRET_KEYS = ("token", "access_token", "auth", "password", "passwd", "pwd", "secret", "key", "apikey",
                "api_key", "signature", "sig", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
                "x-goog-signature", "x-goog-credential", "credential", "session_token", "client_secret")
_QUERY = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&#\s]+)=(?P<value>[^&#\s]*)")


def _mask_query(m: re.Match) -> str:
    name = m.group("name")
    secret = name.lower() in _SECRET_KEYS or any(k in name.lower() for k in ("token", "secret", "password",
                                                                              "signature", "credential"))
    return f"{m.group('sep')}{name}={MASK}" if secret and m.group("value") else m.group(0)


def redact(text: object) -> str:
    """`text` with every URL password and secret-looking query value replaced by ***.
    Works on a bare URL and on a message that contains URLs; other text is returned unchanged."""
    s = str(text)
    if "://" not in s and "=" not in s:
        return s
    s = _USERINFO.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:{MASK}@", s)
    return _QUERY.sub(_mask_query, s) if "?" in s or "&" in s or ";" in s else s


def redact_tree(value):
    """A JSON-like value (dicts, lists, strings) with `redact` applied to every string in it, and
    the values of secret-named keys (`key`, `secret`, `token`, `password`, ...) masked whole:
    fsspec storage options such as `{"key": ..., "secret": ...}` are credentials."""
    if isinstance(value, dict):
        return {k: (MASK if isinstance(k, str) and _secret_name(k) and v not in (None, "") else redact_tree(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v) for v in value)
    return redact(value) if isinstance(value, str) else value


def _secret_name(name: str) -> bool:
    n = name.lower()
    return n in _SECRET_KEYS or n in _SECRET_HEADERS or any(k in n for k in ("token", "secret", "password",
                                                                             "credential", "api-key", "apikey"))


# HTTP headers that carry credentials (storage options' client_kwargs={"headers": {...}})
_SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "x-api-key", "x-auth-token")
