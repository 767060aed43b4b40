"""Test-only pause points, so the adversarial suite can SIGKILL a sync at an exact moment.

Set WEIGHTSYNC_TEST_PAUSE_AT to one of PAUSE_POINTS and the process prints
`weightsync-test: paused at <point> pid <pid>` to stderr when it gets there and
then sleeps until it is killed (or for WEIGHTSYNC_TEST_PAUSE_SECONDS, default 3600).
Unset (always, in production) it costs one dictionary lookup. Used by
tests/adversarial/test_crash_anywhere.py and test_locks.py.
"""

from __future__ import annotations

import os
import sys
import time

PAUSE_ENV = "WEIGHTSYNC_TEST_PAUSE_AT"
PAUSE_POINTS = (
    "locked",                 # holding the revision lock, before planning
    "before-publish",         # every file verified in staging, nothing published yet
    "manifest-written",       # manifests/<rev>.json written, tree not yet renamed
    "renamed",                # revisions/<rev> in place, `current` not flipped yet
    "mirror-upload-completed",  # mirror: a multipart upload completed, its resume state not yet deleted
    "mirror-committed",       # mirror: the new weightsync.lock written, the dropped files not yet deleted
)


def pause(point: str) -> None:
    if os.environ.get(PAUSE_ENV) != point:
        return
    sys.stderr.write(f"weightsync-test: paused at {point} pid {os.getpid()}\n")
    sys.stderr.flush()
    time.sleep(float(os.environ.get("WEIGHTSYNC_TEST_PAUSE_SECONDS", "3600")))
