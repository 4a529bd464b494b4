"""The error of a refused training run."""

from shards.errors import BratsShardsError


class TrainError(BratsShardsError, RuntimeError):
    """A refused training run: the one-line message names the folder, file or option at fault."""
