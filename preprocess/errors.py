"""The error of a patient whose input breaks its release's rules."""

from shards.errors import EXIT_PATIENTS_FAILED, BratsShardsError


class InputError(BratsShardsError, ValueError):
    """A patient's data breaks the release's rules; the message names the file or rule. A build
    records it in the manifest's `failed` and carries on (exit 1)."""

    exit_code = EXIT_PATIENTS_FAILED
