"""Step 2a: which pool samples become landmarks (paper §4.2) — a strategy chosen by name.

``random`` is the paper's and the released code's choice (uniform without replacement) and the reference: it
returns exactly the ids the pipeline drew before strategies existed. The others spend the same budget where
the kernel ridge needs it:

- ``kmeanspp``: k-means++ seeding in embedding space (D² sampling: far-from-chosen samples are likelier);
- ``kcenter``: greedy farthest point (minimises the largest distance of any sample to its nearest landmark);
- ``leverage``: Nyström ridge-leverage scores of the RBF kernel (samples the kernel cannot express from the
  others count more), sampled without replacement in proportion to them;
- ``adaptive``: two rounds; a share of the budget at random, propagate, then the rest on the samples whose
  estimate lies nearest the top-k cut (where a wrong score changes the subset), then refit. It needs exact
  landmark values between the rounds, so it is :func:`boundary_picks` called by whoever holds the gradients.

Held-out samples (fidelity) are always uniform random and disjoint from the landmarks; every strategy is
deterministic for a seed. Ids are sorted first so nothing depends on pool row order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from idistill_core.errors import ConfigError, DataError

STRATEGIES = ("random", "kmeanspp", "kcenter", "leverage", "adaptive")


@dataclass(frozen=True)
class LandmarkConfig:
    """How the landmark budget is spent."""

    strategy: Literal["random", "kmeanspp", "kcenter", "leverage", "adaptive"] = "random"
    first_round: float = 0.5
    """``adaptive``: share of the budget drawn at random before the boundary round; in (0, 1]."""
    leverage_ridge: float = 1e-2
    """``leverage``: relative ridge λ of the scores ``diag(K (K + λ·n·I)⁻¹)``; > 0."""
    leverage_columns: int = 1000
    """``leverage``: at most this many Nyström columns (a seeded uniform subset); >= 1."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"landmarks.strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}."
            )
        if not 0 < self.first_round <= 1:
            raise ConfigError(f"landmarks.first_round must be in (0, 1]; got {self.first_round}.")
        if not self.leverage_ridge > 0:
            raise ConfigError(f"landmarks.leverage_ridge must be > 0; got {self.leverage_ridge}.")
        if self.leverage_columns < 1:
            raise ConfigError(f"landmarks.leverage_columns must be >= 1; got {self.leverage_columns}.")

    @property
    def needs_embeddings(self) -> bool:
        return self.strategy in ("kmeanspp", "kcenter", "leverage")

    def first_round_size(self, num_landmarks: int) -> int:
        """Landmarks drawn before any value is known (all of them except with ``adaptive``)."""
        if self.strategy != "adaptive":
            return num_landmarks
        return max(1, min(num_landmarks, round(self.first_round * num_landmarks)))


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.maximum(d, 0.0)


def _float_rows(emb) -> np.ndarray:
    """``emb`` as a float32 or float64 array WITHOUT a copy when it already is one (the store reads float32)."""
    emb = np.asarray(emb)
    return emb if emb.dtype in (np.float32, np.float64) else emb.astype(np.float64)


def _squared_norms(emb: np.ndarray, block: int = 65536) -> np.ndarray:
    """``‖x_i‖²`` ``(N,)`` float64, block by block (no N × D temporary)."""
    out = np.empty(len(emb), dtype=np.float64)
    for start in range(0, len(emb), block):
        part = emb[start : start + block]
        out[start : start + block] = np.einsum("ij,ij->i", part, part, dtype=np.float64)
    return out


class _Distances:
    """Squared distances from every candidate row to one row, ``‖x‖² + ‖y‖² − 2 x·y`` with the norms computed once:
    one matrix-vector product over the embeddings (in their own dtype, float32 from the store) per landmark.

    ``rows`` (the candidates' rows of ``emb``, in candidate order) spares a gathered copy of ``emb``: the product
    runs over all of ``emb`` and the candidates' entries are read off it. In float32 a distance within rounding
    of zero (``√D·ε·(‖x‖² + ‖y‖²)``) is exactly zero: a duplicate of a chosen row gets no k-means++ mass.
    """

    def __init__(self, emb: np.ndarray, rows: np.ndarray | None = None):
        self.emb = emb
        self.rows = rows
        norms = _squared_norms(emb)
        self.norms = norms
        self.candidate_norms = norms if rows is None else norms[rows]
        self.noise = 0.0 if emb.dtype == np.float64 else np.sqrt(emb.shape[1]) * float(np.finfo(emb.dtype).eps)

    def __len__(self) -> int:
        return len(self.emb) if self.rows is None else len(self.rows)

    def to(self, candidate: int) -> np.ndarray:
        """``(n,)`` float64 squared distances of every candidate to ``candidate``."""
        row = candidate if self.rows is None else int(self.rows[candidate])
        dots = self.emb @ self.emb[row]
        if self.rows is not None:
            dots = dots[self.rows]
        d = self.candidate_norms + self.norms[row] - 2.0 * dots.astype(np.float64)
        floor = self.noise * (self.candidate_norms + self.norms[row]) if self.noise else 0.0
        d[d <= floor] = 0.0
        return d


def _median_sigma(x: np.ndarray, rng: np.random.Generator, sample: int = 1000, rows: np.ndarray | None = None) -> float:
    n = len(x) if rows is None else len(rows)
    if n > sample:
        picked = rng.choice(n, size=sample, replace=False)
        x = x[picked if rows is None else rows[picked]]
    elif rows is not None:
        x = x[rows]
    x = x.astype(np.float64)
    d = _squared_distances(x, x)
    pairs = d[np.triu_indices(len(x), k=1)]
    return max(float(np.sqrt(np.median(pairs))), 1e-6) if pairs.size else 1.0


def kmeanspp(emb: np.ndarray, count: int, rng: np.random.Generator, rows: np.ndarray | None = None) -> list[int]:
    """k-means++ seeding: first row uniform, then each next row with probability ∝ squared distance.

    Embeddings stay in their dtype (float32 from the store: no float64 copy) and each step costs one product over
    them (:class:`_Distances`). With ``rows`` the candidates are those rows of ``emb`` (returned positions index
    ``rows``), without a gathered copy.
    """
    dist = _Distances(_float_rows(emb), rows)
    n = len(dist)
    first = int(rng.integers(n))
    chosen = [first]
    nearest = dist.to(first)
    nearest[first] = 0.0
    while len(chosen) < count:
        total = nearest.sum()
        if total <= 0:  # every remaining row duplicates a chosen one: fall back to uniform
            rest = np.setdiff1d(np.arange(n), chosen)
            pick = int(rng.choice(rest))
        else:
            pick = int(rng.choice(n, p=nearest / total))
        chosen.append(pick)
        np.minimum(nearest, dist.to(pick), out=nearest)
        nearest[pick] = 0.0  # earlier picks stay 0: distances are >= 0
    return chosen


def kcenter(emb: np.ndarray, count: int, rng: np.random.Generator, rows: np.ndarray | None = None) -> list[int]:
    """Greedy farthest-point traversal from a uniform first row (ties: lowest row, i.e. lowest id); one product
    over the embeddings per step, in their own dtype (see :func:`kmeanspp` for ``rows``)."""
    dist = _Distances(_float_rows(emb), rows)
    first = int(rng.integers(len(dist)))
    chosen = [first]
    nearest = dist.to(first)
    nearest[first] = -1.0
    while len(chosen) < count:
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        np.minimum(nearest, dist.to(pick), out=nearest)
        nearest[pick] = -1.0  # earlier picks stay -1: distances are >= 0
    return chosen


def leverage_scores(
    emb: np.ndarray, ridge: float, columns: int, rng: np.random.Generator, rows: np.ndarray | None = None,
    block: int = 16384,
) -> np.ndarray:
    """Nyström ridge-leverage scores ``(n,)`` of the RBF kernel (median bandwidth).

    With ``C = K(E, S)`` over a uniform column subset ``S`` and ``W = K(S, S)``, ``K ≈ C W⁺ Cᵀ`` and
    ``diag(K (K + λI)⁻¹) ≈ diag(C (CᵀC + λW)⁻¹ Cᵀ)`` (Alaoui & Mahoney 2015), with ``λ = ridge · n``.
    ``C`` is never held whole: ``CᵀC`` is summed over row blocks, then each block's scores are read off one LU
    factorisation, recomputing its kernel block (``O(block · m)`` memory instead of ``O(n · m)`` float64; distances
    in the embeddings' dtype, kernel and solves in float64). See :func:`kmeanspp` for ``rows``.
    """
    from scipy.linalg import lu_factor, lu_solve

    emb = _float_rows(emb)
    n = len(emb) if rows is None else len(rows)
    sigma = _median_sigma(emb, rng, rows=rows)
    cols = rng.choice(n, size=min(columns, n), replace=False)
    landmark_rows = cols if rows is None else rows[cols]
    centres = emb[landmark_rows]
    centre_norms = _squared_norms(centres)
    scale = 1.0 / (2 * sigma**2)

    def kernel(start: int) -> np.ndarray:
        index = np.arange(start, min(start + block, n))
        x = emb[index if rows is None else rows[index]]
        d = _squared_norms(x)[:, None] + centre_norms[None, :] - 2.0 * (x @ centres.T).astype(np.float64)
        return np.exp(-np.maximum(d, 0.0) * scale)

    exact = centres.astype(np.float64)
    w = np.exp(-_squared_distances(exact, exact) * scale)  # W = K(S, S)
    gram = np.zeros((len(cols), len(cols)))
    for start in range(0, n, block):
        c = kernel(start)
        gram += c.T @ c
    lam = ridge * n
    inner = gram + lam * w + 1e-10 * np.eye(len(cols))
    factor = lu_factor(inner)
    scores = np.empty(n)
    for start in range(0, n, block):
        c = kernel(start)
        solved = lu_solve(factor, c.T)  # (m, b)
        scores[start : start + len(c)] = np.einsum("ij,ji->i", c, solved)
    return np.clip(scores, 1e-12, None)


def choose(
    sample_ids: Sequence[str],
    num_landmarks: int,
    num_holdout: int,
    seed: int,
    config: LandmarkConfig | None = None,
    embeddings: np.ndarray | None = None,
) -> tuple[list[str], list[str]]:
    """``(landmark ids, held-out ids)`` for a strategy; with ``adaptive``, only its first (random) round.

    Args:
        sample_ids: the pool ids (any order).
        num_landmarks: L, ``1 ≤ L ≤ N``.
        num_holdout: held-out samples (clipped to ``N − L``).
        seed: the only randomness.
        config: the strategy (default ``random``).
        embeddings: ``(N, D)`` rows aligned with ``sample_ids``; needed by the coverage strategies.
    """
    config = config or LandmarkConfig()
    n = len(sample_ids)
    if num_landmarks > n:
        raise ConfigError(f"num_landmarks={num_landmarks} exceeds the pool size N={n}; choose L <= N.")
    num_holdout = min(num_holdout, n - num_landmarks)
    order = sorted(range(n), key=lambda i: sample_ids[i])
    ordered = [sample_ids[i] for i in order]
    rng = np.random.default_rng(seed)
    # the draw of the random strategy, kept bit for bit: its first L are the landmarks, the next H held out
    picks = rng.choice(n, size=num_landmarks + num_holdout, replace=False)
    holdout = [ordered[i] for i in picks[num_landmarks:]]
    if not config.needs_embeddings:
        first = config.first_round_size(num_landmarks)
        return [ordered[i] for i in picks[:first]], holdout
    if embeddings is None:
        raise ConfigError(f"landmarks.strategy={config.strategy!r} needs the pool embeddings.")
    emb = _float_rows(embeddings)  # float32 from the store stays float32: no N × D copy at all
    if emb.ndim != 2 or emb.shape[0] != n:
        raise DataError(f"embeddings must be (N={n}, D); got shape {emb.shape}")
    held = np.zeros(n, dtype=bool)
    held[picks[num_landmarks:]] = True
    free = np.flatnonzero(~held)  # candidates: positions in id order, held-out samples excluded
    rows = np.asarray(order, dtype=np.int64)[free]  # their rows of `embeddings`
    if config.strategy == "kmeanspp":
        chosen = kmeanspp(emb, num_landmarks, rng, rows=rows)
    elif config.strategy == "kcenter":
        chosen = kcenter(emb, num_landmarks, rng, rows=rows)
    else:
        scores = leverage_scores(emb, config.leverage_ridge, config.leverage_columns, rng, rows=rows)
        chosen = rng.choice(len(rows), size=num_landmarks, replace=False, p=scores / scores.sum()).tolist()
    return [ordered[int(free[r])] for r in chosen], holdout


def boundary_picks(
    sample_ids: Sequence[str],
    estimate: np.ndarray,
    budget: int,
    count: int,
    exclude: Sequence[str],
) -> list[str]:
    """The adaptive strategy's second round: ``count`` samples whose estimated score lies nearest the top-k cut.

    The cut is the midpoint between the ``budget``-th and ``budget+1``-th highest estimates; samples already
    landmarks or held out are skipped; ties by id. Deterministic (no randomness left at this point).

    Args:
        sample_ids: the pool ids, aligned with ``estimate``.
        estimate: ``(N,)`` or ``(N, T)`` current propagated scores (columns are averaged: the mean target).
        budget: k of the selection.
        count: how many more landmarks.
        exclude: ids that may not be picked.
    """
    est = np.asarray(estimate, dtype=np.float64)
    est = est.mean(axis=1) if est.ndim == 2 else est
    n = len(sample_ids)
    if est.shape != (n,):
        raise DataError(f"estimate has shape {est.shape}; expected ({n},) or ({n}, T)")
    if not 1 <= budget <= n:
        raise ConfigError(f"budget k={budget} must satisfy 0 < k <= N={n}.")
    ranked = np.sort(est)[::-1]
    cut = ranked[budget - 1] if budget == n else 0.5 * (ranked[budget - 1] + ranked[budget])
    banned = set(exclude)
    candidates = [i for i in range(n) if sample_ids[i] not in banned]
    candidates.sort(key=lambda i: (abs(est[i] - cut), sample_ids[i]))
    return [sample_ids[i] for i in candidates[:count]]
