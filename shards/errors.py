"""One exception base for every refusal the project makes on purpose.

A `BratsShardsError` carries a one-line message that names the patient, file or URL at fault;
the CLI prints it as `error: ...` and exits with the error's `exit_code`:

  0  everything done
  1  the job ran, but some patients failed (named in the summary and the manifest)
  2  bad usage or refused input: nothing (more) was done
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PATIENTS_FAILED = 1
EXIT_REFUSED = 2


class BratsShardsError(Exception):
    """A clean refusal: the message is one line and names what is at fault."""

    exit_code = EXIT_REFUSED

    def __str__(self) -> str:  # one line, whatever the message was built from
        return " ".join(super().__str__().split())
