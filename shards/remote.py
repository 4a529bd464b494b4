"""How a remote read fails: which errors are worth another attempt, when a server is too slow,
and what the one line naming a failure says (the server's own words capped)."""

from __future__ import annotations

import asyncio


def is_transient(e: BaseException) -> bool:
    """Worth another attempt: a server error, a dropped connection, a timeout; not 404/403."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - http(s) needs aiohttp; other protocols may not
        aiohttp = None
    if aiohttp is not None:
        if isinstance(e, aiohttp.ClientResponseError):
            return e.status >= 500 or e.status in (408, 429)
        if isinstance(e, (aiohttp.ClientSSLError, aiohttp.InvalidURL)):  # retrying will not help
            return False
        if isinstance(e, aiohttp.ClientError):  # connection refused/reset, payload cut short
            return True
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # s3 is optional
        BotoConnectionError = ()
    if BotoConnectionError and isinstance(e, BotoConnectionError):  # refused, reset, timed out
        return True
    return isinstance(e, (TimeoutError, asyncio.TimeoutError, ConnectionError, OSError))


_SERVER_TEXT = 200  # characters of what a server says (a reason phrase, an error body) in one line


def failure_reason(e: BaseException, timeout: float) -> str:
    """What went wrong with a remote read, in one capped line."""
    try:
        import aiohttp

        if isinstance(e, aiohttp.ClientResponseError):
            return f"HTTP {e.status} {' '.join(str(e.message).split())[:_SERVER_TEXT]}".strip()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(e, TooSlow):
        return str(e)
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        return f"no response within the {timeout:g} s timeout ({type(e).__name__})"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:_SERVER_TEXT]}" if text else type(e).__name__


class TooSlow(TimeoutError):
    """A transfer whose average rate fell below the minimum (a server that trickles bytes)."""


MIN_RATE = 64 * 1024  # bytes/s a download must average, after its first `timeout` seconds
