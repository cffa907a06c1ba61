"""Step 5: turn scores or weights into a budgeted subset (paper §1.8, §5).

Every selector is deterministic: ties are broken by score descending, then ``sample_id`` ascending,
and the only randomness (the round-robin target order) comes from an explicit seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from idistill_core.errors import ConfigError, DataError


@dataclass
class Selection:
    """A budgeted subset.

    Attributes:
        sample_ids: the selected ids in pick order.
        scores: ``(k,)`` float64, each sample's score when it was picked.
        method: the selector that produced it (``top_k``, ``round_robin``, ``weights``, ``mid_ppl``...).
        targets: for ``round_robin``, the target column that picked each sample; else None.
    """

    sample_ids: list[str]
    scores: np.ndarray
    method: str
    targets: np.ndarray | None = field(default=None)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def rank(self) -> dict[str, int]:
        """``sample_id -> position`` in pick order (0 = first)."""
        return {sid: i for i, sid in enumerate(self.sample_ids)}


def _to_numpy(x: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _check(sample_ids: Sequence[str], scores: np.ndarray, k: int, name: str = "scores") -> None:
    n = len(sample_ids)
    if scores.shape[0] != n:
        raise DataError(f"{name} has {scores.shape[0]} rows but there are {n} sample_ids")
    if not 1 <= k <= n:
        raise ConfigError(f"k must be in [1, {n}] (the pool size); got {k}")
    bad = ~np.isfinite(scores)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"{name} is not finite for sample '{sample_ids[row]}'")


def _id_rank(sample_ids: Sequence[str]) -> np.ndarray:
    """Position of each id in ascending id order (the tie-breaker)."""
    order = sorted(range(len(sample_ids)), key=lambda i: sample_ids[i])
    ranks = np.empty(len(sample_ids), dtype=np.int64)
    ranks[order] = np.arange(len(sample_ids))
    return ranks


def _order(scores: np.ndarray, id_rank: np.ndarray) -> np.ndarray:
    """Indices by score descending, then sample_id ascending."""
    return np.lexsort((id_rank, -scores))


def select_top_k(
    sample_ids: Sequence[str],
    scores: torch.Tensor | np.ndarray,
    k: int,
    sources: Sequence[str] | None = None,
    per_source_cap: int | None = None,
) -> Selection:
    """The ``k`` highest-scoring samples, optionally at most ``per_source_cap`` from any one source.

    Args:
        sample_ids: ``N`` unique ids.
        scores: ``(N,)``.
        k: budget, ``1 ≤ k ≤ N``.
        sources: ``N`` source names (needed with ``per_source_cap``).
        per_source_cap: max picks per source; capped-out samples are skipped, not re-scored.

    Raises:
        ConfigError: bad ``k``/cap, or the cap leaves fewer than ``k`` eligible samples.
    """
    s = _to_numpy(scores).reshape(-1)
    _check(sample_ids, s, k)
    order = _order(s, _id_rank(sample_ids))
    if per_source_cap is None:
        picked = order[:k]
    else:
        if per_source_cap < 1:
            raise ConfigError(f"per_source_cap must be >= 1; got {per_source_cap}")
        if sources is None or len(sources) != len(sample_ids):
            raise ConfigError("per_source_cap needs one source per sample_id")
        counts: dict[str, int] = {}
        chosen = []
        for i in order:
            src = sources[i]
            if counts.get(src, 0) < per_source_cap:
                counts[src] = counts.get(src, 0) + 1
                chosen.append(i)
                if len(chosen) == k:
                    break
        if len(chosen) < k:
            raise ConfigError(
                f"per_source_cap={per_source_cap} over {len(set(sources))} sources allows only "
                f"{len(chosen)} samples; k={k}"
            )
        picked = np.asarray(chosen)
    return Selection([sample_ids[i] for i in picked], s[picked], "top_k")


def round_robin(
    sample_ids: Sequence[str],
    scores: torch.Tensor | np.ndarray,
    k: int,
    seed: int,
    *,
    fixed_order: bool = False,
    sources: Sequence[str] | None = None,
    per_source_cap: int | None = None,
    quotas: Sequence[int] | None = None,
) -> Selection:
    """Round-robin over target columns (official code, paper §5).

    Each round visits the ``T`` targets in a fresh permutation from ``numpy.random.default_rng(seed)``
    (``fixed_order``: in column order every round, as RDS+'s code does); each takes its best not-yet-selected
    sample, until ``k`` are selected. Without caps memory is ``O(T · k)``: a column can never need more than its
    top ``k`` entries (everything it skips was selected).

    Args:
        sample_ids: ``N`` unique ids.
        scores: ``(N, T)`` (a 1-D ``(N,)`` is one target).
        k: budget, ``1 ≤ k ≤ N``.
        seed: seed of the per-round target permutations.
        fixed_order: visit targets 0..T-1 every round (no randomness).
        sources: ``N`` source names (needed with ``per_source_cap``).
        per_source_cap: at most this many picks from one source; a full source's samples are skipped.
        quotas: ``T`` per-column pick limits summing to ``k`` (multi-target mixes); a column at its quota
            passes its turn.

    Raises:
        ConfigError: bad cap/quotas, or caps leave fewer than ``k`` eligible samples.
    """
    s = _to_numpy(scores)
    if s.ndim == 1:
        s = s[:, None]
    _check(sample_ids, s, k)
    n, n_targets = s.shape
    if n_targets == 0:
        raise DataError("scores has no target columns")
    capped = per_source_cap is not None
    if capped:
        if per_source_cap < 1:
            raise ConfigError(f"per_source_cap must be >= 1; got {per_source_cap}")
        if sources is None or len(sources) != n:
            raise ConfigError("per_source_cap needs one source per sample_id")
    if quotas is not None:
        quotas = [int(q) for q in quotas]
        if len(quotas) != n_targets or min(quotas) < 0 or sum(quotas) != k:
            raise ConfigError(f"quotas must be {n_targets} non-negative counts summing to k={k}; got {quotas}")
    id_rank = _id_rank(sample_ids)
    candidates = []
    for t in range(n_targets):
        col = s[:, t]
        limit = k if quotas is None else quotas[t]
        if not capped and quotas is None and k < n:
            # Keep every entry tied with the k-th so the tie-break by id is exact.
            kth = np.partition(col, n - limit)[n - limit]
            idx = np.nonzero(col >= kth)[0]
        else:
            idx = np.arange(n)  # caps or other columns' picks may skip far down a column
        candidates.append(idx[_order(col[idx], id_rank[idx])])
    pointers = np.zeros(n_targets, dtype=np.int64)
    taken = np.zeros(n_targets, dtype=np.int64)
    used = np.zeros(n, dtype=bool)
    counts: dict[str, int] = {}
    rng = np.random.default_rng(seed)
    picked, picked_scores, picked_by = [], [], []
    while len(picked) < k:
        before = len(picked)
        order = range(n_targets) if fixed_order else rng.permutation(n_targets)
        for t in order:
            if quotas is not None and taken[t] >= quotas[t]:
                continue
            cand = candidates[t]
            ptr = pointers[t]
            while ptr < len(cand) and (
                used[cand[ptr]] or (capped and counts.get(sources[cand[ptr]], 0) >= per_source_cap)
            ):
                ptr += 1
            pointers[t] = ptr
            if ptr == len(cand):
                continue
            i = int(cand[ptr])
            used[i] = True
            if capped:
                counts[sources[i]] = counts.get(sources[i], 0) + 1
            taken[t] += 1
            picked.append(i)
            picked_scores.append(s[i, t])
            picked_by.append(int(t))
            if len(picked) == k:
                break
        if len(picked) == before:
            raise ConfigError(
                f"round-robin found only {len(picked)} eligible samples for k={k}"
                + (f" (per_source_cap={per_source_cap} over {len(set(sources))} sources)" if capped else "")
            )
    return Selection(
        [sample_ids[i] for i in picked], np.asarray(picked_scores), "round_robin", np.asarray(picked_by)
    )


def mix_budgets(k: int, weights: Sequence[float]) -> list[int]:
    """Per-target budgets summing to ``k`` in proportion to ``weights`` (largest remainder; ties to the
    earlier target)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"target weights must be non-negative, finite and not all zero; got {list(weights)}")
    share = k * w / w.sum()
    base = np.floor(share).astype(np.int64)
    rest = k - int(base.sum())
    order = sorted(range(len(w)), key=lambda i: (-(share[i] - base[i]), i))
    for i in order[:rest]:
        base[i] += 1
    return [int(b) for b in base]


def select_mix(
    sample_ids: Sequence[str],
    target_scores: Sequence[np.ndarray],
    k: int,
    weights: Sequence[float] | None = None,
    sources: Sequence[str] | None = None,
    per_source_cap: int | None = None,
) -> Selection:
    """One subset for several targets: target ``j`` gets ``mix_budgets(k, weights)[j]`` picks, taken in
    round-robin (targets in the order given, each its best remaining sample by its own score).

    Args:
        target_scores: one ``(N,)`` score per target (e.g. a target's mean-gradient influence).
        weights: per-target weights (default equal).

    Returns:
        ``Selection`` whose ``targets`` says which target picked each sample.
    """
    if not target_scores:
        raise ConfigError("select_mix needs at least one target")
    columns = np.stack([_to_numpy(t).reshape(-1) for t in target_scores], axis=1)
    quotas = mix_budgets(k, [1.0] * columns.shape[1] if weights is None else weights)
    if len(quotas) != columns.shape[1]:
        raise ConfigError(f"{len(quotas)} target weights for {columns.shape[1]} targets")
    out = round_robin(
        sample_ids, columns, k, 0, fixed_order=True, sources=sources, per_source_cap=per_source_cap, quotas=quotas
    )
    out.method = "mix"
    return out


def select_from_weights(sample_ids: Sequence[str], weights: torch.Tensor | np.ndarray, k: int) -> Selection:
    """The non-zero QP weights, largest first (ties by id), truncated to ``k``.

    ``influence.solve_qp`` may return more than ``k`` non-zeros when ``k`` is unreachable (its
    ``exact=False`` case); the ``k`` largest are kept.

    Raises:
        DataError: a weight is negative or not finite, or fewer than ``k`` weights are non-zero.
    """
    w = _to_numpy(weights).reshape(-1)
    _check(sample_ids, w, k, "weights")
    if (w < 0).any():
        row = int(np.argmax(w < 0))
        raise DataError(f"weights must be >= 0; sample '{sample_ids[row]}' has {w[row]}")
    nonzero = int((w > 0).sum())
    if nonzero < k:
        raise DataError(f"weights have only {nonzero} non-zero entries; k={k}")
    order = _order(w, _id_rank(sample_ids))[:k]
    return Selection([sample_ids[i] for i in order], w[order], "weights")
