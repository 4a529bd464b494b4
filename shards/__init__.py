"""The on-disk contract between preprocessing and training: writers, readers, manifest."""

FORMAT_NAME = "brats-shards"
FORMAT_VERSION = 2  # 2: wds tars named wds/{split}-{pid}.tar (1: wds/{split}-NNNNNN.tar)
MANIFEST = "manifest.json"
