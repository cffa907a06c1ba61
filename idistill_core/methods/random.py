"""Method ``random``: a uniform random subset (seeded by sample id, so it does not depend on row order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from idistill_core.methods.base import SelectionContext, SelectionReport
from idistill_core.pipeline.selection import select_samples


def random_scores(sample_ids: Sequence[str], seed: int) -> np.ndarray:
    """Uniform ``[0, 1)`` scores ``(N,)`` derived from ``(seed, sample_id)``.

    A hash rather than an RNG stream, so a sample's score does not depend on row order or on the
    other samples; top-k of these is a uniform random subset.
    """
    out = np.empty(len(sample_ids), dtype=np.float64)
    for i, sid in enumerate(sample_ids):
        digest = hashlib.blake2b(f"{seed}\x00{sid}".encode(), digest_size=8).digest()
        out[i] = (int.from_bytes(digest, "big") >> 11) / float(1 << 53)
    return out


def select(ctx: SelectionContext) -> SelectionReport:
    """A seeded uniform subset of ``ctx.budget`` pool samples (per-source caps honoured)."""
    ids = ctx.pool_ids
    with ctx.timed("baseline"):
        scores = random_scores(ids, ctx.recipe.seed)
        outcome = select_samples(ids, scores, ctx.budget, method="random", **ctx.caps(ids))
    return ctx.report(outcome)
