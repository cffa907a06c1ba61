"""Test-only fault injection: kill (or signal) the process at a named commit or rename point.

Set ``IDISTILL_FAULT=<point>[:<nth>[:<signal>]]`` and the ``nth`` (default 1) time the process reaches
``point`` it sends itself ``signal`` (default ``KILL``; ``TERM`` and ``INT`` test the interruption path). With
the variable unset, :func:`point` is one dictionary lookup. Points:

- ``store.commit.before`` / ``store.commit.after``: around every LanceDB commit (create, insert, restore)
- ``rename.before`` / ``rename.after``: around every atomic publish of a file or folder (``artifacts``):
  gradient shards, landmark and target files, selection outputs, the pool parquet
"""

from __future__ import annotations

import os
import signal

ENV = "IDISTILL_FAULT"
POINTS = ("store.commit.before", "store.commit.after", "rename.before", "rename.after")

_hits: dict[str, int] = {}  # per process: the nth hit must count every earlier one


def point(name: str) -> None:
    """Reached commit/rename point ``name``; signal this process if ``IDISTILL_FAULT`` asks for it."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    wanted, _, rest = spec.partition(":")
    if wanted != name:
        return
    nth, _, sig = rest.partition(":")
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))
