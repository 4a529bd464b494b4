"""One exception base for every refusal the project makes on purpose.

A `BratsShardsError` carries a one-line message that names the patient, file or URL at fault;
the CLI prints it as `error: ...` and exits with the error's `exit_code`:

  0  everything done
  1  the job ran, but some patients failed (named in the summary and the manifest)
  2  bad usage or refused input: nothing (more) was done
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_PATIENTS_FAILED = 1
EXIT_REFUSED = 2


class BratsShardsError(Exception):
    """A clean refusal: the message is one line and names what is at fault."""

    exit_code = EXIT_REFUSED

    def __str__(self) -> str:  # one line, whatever the message was built from
        return one_line(super().__str__())


MAX_MESSAGE = 1000  # characters of an error line; what a server or a file says can be any length
_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\s*\nOriginal Traceback")


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` as one line of at most `limit` characters. An error a DataLoader worker raised comes
    back wrapped in its traceback ("Caught X in DataLoader worker process N. Original Traceback
    ..."): the line is then the original message, the traceback's last line."""
    text = str(text)
    if _WORKER.match(text):
        last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        text = re.sub(r"^[A-Za-z_][\w.]*(Error|Exception|Failed|Timeout|Exit)\w*: ", "", last)
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 40].rstrip() + f" ... ({len(text) - limit + 40} characters cut)"
    return text
