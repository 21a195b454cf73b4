"""Named crash points, so tests can SIGKILL a real `synfer` process at an exact moment.

    SYNFER_CRASH_AT=write:2 synfer run recipe.yaml    # killed the 2nd time the writer reaches "write"

Points: "generate" (a batch is sampled, nothing written yet), "calibrate" (the vote is cast),
"write" (images renamed into place, metadata not yet appended), "merge" (merged metadata
written to its temp file), "merged" (merged metadata in place, rank parts not yet removed), "train_iter" (a training iteration
and its checkpoint, if one was due, are done).
Unset (always, outside tests), a point costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "SYNFER_CRASH_AT"
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
