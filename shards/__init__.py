"""The on-disk contract between preprocessing and training: writers, readers, manifest."""

FORMAT_NAME = "brats-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
