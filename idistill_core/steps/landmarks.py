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


def _median_sigma(x: np.ndarray, rng: np.random.Generator, sample: int = 1000) -> float:
    if len(x) > sample:
        x = x[rng.choice(len(x), size=sample, replace=False)]
    d = _squared_distances(x, x)
    pairs = d[np.triu_indices(len(x), k=1)]
    return max(float(np.sqrt(np.median(pairs))), 1e-6) if pairs.size else 1.0


def kmeanspp(emb: np.ndarray, count: int, rng: np.random.Generator) -> list[int]:
    """k-means++ seeding: first row uniform, then each next row with probability ∝ squared distance."""
    n = len(emb)
    first = int(rng.integers(n))
    chosen = [first]
    nearest = _squared_distances(emb, emb[[first]])[:, 0]
    nearest[first] = 0.0
    while len(chosen) < count:
        total = nearest.sum()
        if total <= 0:  # every remaining row duplicates a chosen one: fall back to uniform
            rest = np.setdiff1d(np.arange(n), chosen)
            pick = int(rng.choice(rest))
        else:
            pick = int(rng.choice(n, p=nearest / total))
        chosen.append(pick)
        nearest = np.minimum(nearest, _squared_distances(emb, emb[[pick]])[:, 0])
        nearest[chosen] = 0.0
    return chosen


def kcenter(emb: np.ndarray, count: int, rng: np.random.Generator) -> list[int]:
    """Greedy farthest-point traversal from a uniform first row (ties: lowest row, i.e. lowest id)."""
    first = int(rng.integers(len(emb)))
    chosen = [first]
    nearest = _squared_distances(emb, emb[[first]])[:, 0]
    nearest[first] = -1.0
    while len(chosen) < count:
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, _squared_distances(emb, emb[[pick]])[:, 0])
        nearest[chosen] = -1.0
    return chosen


def leverage_scores(emb: np.ndarray, ridge: float, columns: int, rng: np.random.Generator) -> np.ndarray:
    """Nyström ridge-leverage scores ``(n,)`` of the RBF kernel (median bandwidth).

    With ``C = K(E, S)`` over a uniform column subset ``S`` and ``W = K(S, S)``, ``K ≈ C W⁺ Cᵀ`` and
    ``diag(K (K + λI)⁻¹) ≈ diag(C (CᵀC + λW)⁻¹ Cᵀ)`` (Alaoui & Mahoney 2015), with ``λ = ridge · n``.
    """
    n = len(emb)
    sigma = _median_sigma(emb, rng)
    cols = rng.choice(n, size=min(columns, n), replace=False)
    c = np.exp(-_squared_distances(emb, emb[cols]) / (2 * sigma**2))
    w = c[cols]
    lam = ridge * n
    inner = c.T @ c + lam * w + 1e-10 * np.eye(len(cols))
    solved = np.linalg.solve(inner, c.T)  # (m, n)
    return np.clip(np.einsum("ij,ji->i", c, solved), 1e-12, None)


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
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise DataError(f"embeddings must be (N={n}, D); got shape {emb.shape}")
    emb = emb[order]
    held = {int(i) for i in picks[num_landmarks:]}
    free = np.array([i for i in range(n) if i not in held])
    sub = emb[free]
    if config.strategy == "kmeanspp":
        rows = kmeanspp(sub, num_landmarks, rng)
    elif config.strategy == "kcenter":
        rows = kcenter(sub, num_landmarks, rng)
    else:
        scores = leverage_scores(sub, config.leverage_ridge, config.leverage_columns, rng)
        rows = rng.choice(len(sub), size=num_landmarks, replace=False, p=scores / scores.sum()).tolist()
    return [ordered[int(free[r])] for r in rows], holdout


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
