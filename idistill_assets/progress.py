"""Progress lines a person can plan by, for the Dagster run log (and the Ray driver's Pipes log): done / total,
the share done, the time spent and about how long is left.

The core reports progress through ``on_commit`` / ``on_chunk`` callbacks ``(done, total)``; ``eta_logger`` turns
one into such a callback. The estimate is the pace so far (``elapsed / done``) times what is left, so the first
line of a resumed run, whose reused work counts as done, is optimistic until real work has been timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def clock(seconds: float | None) -> str:
    """``1:02:03`` / ``2:03`` for people; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(what: str, done: int, total: int, elapsed: float, unit: str = "") -> str:
    """``embeddings: committed 64 / 120 samples (53%), 0:12 elapsed, about 0:10 left``."""
    left = elapsed / done * (total - done) if done > 0 else None
    share = f"{done / total:.0%}" if total else "100%"
    unit = f" {unit}" if unit else ""
    return f"{what} {done} / {total}{unit} ({share}), {clock(elapsed)} elapsed, about {clock(left)} left"


def eta_logger(log, what: str, unit: str = "") -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that logs :func:`progress_line` through ``log.info`` (a Dagster
    ``context.log`` or a Pipes ``pipes.log``); the clock starts when the callback is made."""
    start = time.monotonic()

    def report(done: int, total: int) -> None:
        log.info(progress_line(what, done, total, time.monotonic() - start, unit))

    return report
