"""Names that come from data and become file names: patient ids and shard-set relative paths.

Everything here is a check on untrusted text (a manifest from a colleague or a URL, a folder
name from a release): a patient id never holds a path separator or `..`, and a relative path
never leaves its root.
"""

from __future__ import annotations

import re

# Sample keys are `{pid}_s{NNN}` and tar member names `{key}.image.npy`: a plain ustar header
# holds 100 characters of name, so ids stay well under that.
MAX_PID_LEN = 80
_PID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_RELPATH_LEN = 512
# what the writers ever produce: no '%', '?', '#' (a URL would read them as escapes, a query or
# a fragment and leave the set's prefix), no control characters, no spaces
_RELPATH = re.compile(r"[A-Za-z0-9._/-]+")


def patient_id_problem(pid) -> str | None:
    """Why `pid` cannot be a patient id (None when it can)."""
    if not isinstance(pid, str) or not pid:
        return f"patient id {pid!r} is not a non-empty string"
    if len(pid) > MAX_PID_LEN:
        return f"patient id {pid[:40]!r}... is {len(pid)} characters long; at most {MAX_PID_LEN} are supported"
    if not _PID.fullmatch(pid) or ".." in pid:
        return (f"patient id {pid!r} has characters other than letters, digits, '.', '_' and '-' "
                f"(or starts with one of '._-', or holds '..')")
    return None


def relpath_problem(path) -> str | None:
    """Why `path` is not a safe shard-set relative path (None when it is): POSIX separators,
    no absolute path, no `.`/`..`/empty component, no backslash or NUL, bounded length."""
    if not isinstance(path, str) or not path:
        return f"path {path!r} is not a non-empty string"
    if len(path) > MAX_RELPATH_LEN:
        return f"path {path[:40]!r}... is longer than {MAX_RELPATH_LEN} characters"
    if path.startswith("/") or not _RELPATH.fullmatch(path):
        return f"path {path!r} is absolute or holds characters other than letters, digits, '.', '_', '-', '/'"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return f"path {path!r} has an empty, '.' or '..' component"
    return None
