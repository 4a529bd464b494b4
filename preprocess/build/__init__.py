"""`build-shards`: the Dask job. One task per patient; the driver alone writes the manifest.

Crash safety and resume (durable.py):
  * OUTPUT/.lock is held (flock) for the whole build: a second build into it is refused.
  * each patient's files are written under temporary names and renamed when complete; once
    they are flushed to disk (on a background thread, so the worker goes on with the next
    patient) OUTPUT/.build/done/{pid}.json (the task's small result dict) is written;
  * a re-run with the same config skips patients whose done record and files are in place,
    so a killed build completes without redoing finished work, to the same bytes (plan.py);
  * manifest.json is written last and atomically (run.py; its schema: shards/manifest.py).

Incremental builds: every file is named from its patient's id and split (shards/layout.py), so a
re-run after patients were added builds only those, and a re-run after patients were removed
deletes only their files; either way the folder ends byte-identical to a fresh build of the
same input.

What a build deletes: only what it (or an earlier run into the same folder) wrote: files that a
previous manifest or `.build/done` record lists, or that this run wrote, and that the new manifest
does not list; temporaries of exactly the names our writers use (`.{name}.{pid}.tmp`, see
shards/atomic.py); folders those deletions leave empty. Anything else in the output folder is
left alone. A non-empty output folder that holds neither a shard set
(manifest.json) nor an unfinished build (.build/config.json) is refused, so a typo in the output
path never mixes a shard set into someone's files.

Every failure to write (read-only folder, output path is a file, disk full) is a one-line
BuildError naming the path; a patient's bad input is an InputError recorded in `failed`.
"""

from preprocess.build.config import BuildConfig, BuildError, BuildResult
from preprocess.build.durable import OutputLock
from preprocess.build.plan import assign_splits, split_score
from preprocess.build.run import build

__all__ = ["BuildConfig", "BuildError", "BuildResult", "OutputLock", "assign_splits", "build", "split_score"]
