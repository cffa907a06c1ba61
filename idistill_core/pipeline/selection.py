"""Step 5: scores → a budgeted subset with weights (:class:`SelectionOutcome`), per-source caps, and mixes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from idistill_core.errors import ConfigError


@dataclass
class SelectionOutcome:
    """One row per pool sample (aligned lists/arrays) plus the selection in pick order."""

    sample_ids: list[str]
    scores: np.ndarray
    """(N,) aggregated score (mean over target columns, or the baseline's score)."""
    weights: np.ndarray
    """(N,) non-negative weights summing to N over the selected samples, zero elsewhere."""
    selected: list[str]
    """Selected ids in pick order (rank 0 first)."""
    method: str
    details: dict = field(default_factory=dict)

    def rank(self) -> np.ndarray:
        """(N,) pick rank of each sample, -1 when not selected."""
        position = {sample_id: r for r, sample_id in enumerate(self.selected)}
        return np.array([position.get(s, -1) for s in self.sample_ids], dtype=np.int64)

    def to_arrow(self, sources: Sequence[str] | None = None):
        import pyarrow as pa

        chosen = set(self.selected)
        columns = {
            "sample_id": pa.array(self.sample_ids, pa.string()),
            "score": pa.array(self.scores.astype(np.float64)),
            "weight": pa.array(self.weights.astype(np.float64)),
            "selected": pa.array([s in chosen for s in self.sample_ids]),
            "rank": pa.array(self.rank()),
        }
        if sources is not None:
            columns["source"] = pa.array(list(sources), pa.string())
        return pa.table(columns)


def uniform_weights(sample_ids: Sequence[str], picked: Sequence[str]) -> np.ndarray:
    """(N,) weights spreading the total N evenly over ``picked`` (zero elsewhere)."""
    index = {s: i for i, s in enumerate(sample_ids)}
    weights = np.zeros(len(sample_ids))
    weights[[index[s] for s in picked]] = len(sample_ids) / len(picked)
    return weights


def cap_options(ids: Sequence[str], per_source_cap: int | None, source_of: Mapping[str, str] | None) -> dict:
    """``select_samples`` keywords for a per-source cap over ``ids`` (none without a cap).

    Raises:
        ConfigError: a cap is set but the sources of the pool are not known here.
    """
    if per_source_cap is None:
        return {}
    if source_of is None:
        raise ConfigError("per_source_cap is set but this selection was given no pool sources.")
    return {"sources": [source_of.get(s, "") for s in ids], "per_source_cap": per_source_cap}


def check_budget(budget: int, n: int) -> None:
    if budget <= 0 or budget > n:
        raise ConfigError(f"budget k={budget} must satisfy 0 < k <= N={n} (the number of usable pool samples).")


def select_samples(
    sample_ids: Sequence[str],
    scores: np.ndarray,
    budget: int,
    aggregate: str = "mean",
    seed: int = 0,
    method: str = "id",
    sources: Sequence[str] | None = None,
    per_source_cap: int | None = None,
    fixed_order: bool = False,
) -> SelectionOutcome:
    """Scores ``(N,)`` or ``(N, T)`` → a budgeted subset with first-order weights (paper §1.5).

    ``fixed_order``: round-robin visits targets in column order every round (RDS+), not a seeded permutation.

    The weights are the closed-form first-order QP solution (simplex projection of the scores), whose support
    is exactly the top-k; with round-robin the support is the round-robin picks.
    """
    from idistill_core.steps.qp import first_order_weights
    from idistill_core.steps.select import round_robin, select_top_k

    sample_ids = list(sample_ids)
    check_budget(budget, len(sample_ids))
    scores = np.asarray(scores, dtype=np.float64)
    matrix = scores if scores.ndim == 2 else scores[:, None]
    aggregated = matrix.mean(axis=1)
    if aggregate == "rr" and matrix.shape[1] > 1:
        picked = list(
            round_robin(
                sample_ids, matrix, budget, seed, fixed_order=fixed_order, sources=sources,
                per_source_cap=per_source_cap,
            ).sample_ids
        )
        weights = uniform_weights(sample_ids, picked)
    else:
        selection = select_top_k(sample_ids, aggregated, budget, sources=sources, per_source_cap=per_source_cap)
        picked = list(selection.sample_ids)
        weights = np.zeros(len(sample_ids))
        if per_source_cap is None:
            weights = first_order_weights(torch.from_numpy(aggregated), budget, float(len(sample_ids))).numpy()
        if per_source_cap is not None or np.count_nonzero(weights) != len(picked):
            # caps (or exact ties) change the support: spread the mass uniformly over the picks instead
            weights = uniform_weights(sample_ids, picked)
    return SelectionOutcome(sample_ids, aggregated, weights, picked, method)


def mix_outcome(
    outcomes: Sequence[SelectionOutcome],
    budget: int,
    weights: Sequence[float] | None,
    per_source_cap: int | None = None,
    source_of: Mapping[str, str] | None = None,
) -> SelectionOutcome:
    """One subset for several targets from their per-target outcomes: target ``j`` gets its share of
    ``budget`` (``select.mix_budgets``), picked round-robin by its own aggregated score (caps honoured)."""
    from idistill_core.steps.select import mix_budgets, select_mix

    ids = sorted(outcomes[0].sample_ids)
    columns = []
    for outcome in outcomes:
        score = dict(zip(outcome.sample_ids, outcome.scores, strict=True))
        if set(score) != set(ids):
            raise ConfigError("multi-target mix: the targets' outcomes do not cover the same pool samples.")
        columns.append(np.array([score[s] for s in ids], dtype=np.float64))
    selection = select_mix(ids, columns, budget, weights, **cap_options(ids, per_source_cap, source_of))
    picked = list(selection.sample_ids)
    details = {"budgets": mix_budgets(budget, weights or [1.0] * len(outcomes)), "picked_by": selection.targets.tolist()}
    return SelectionOutcome(ids, np.mean(columns, axis=0), uniform_weights(ids, picked), picked, "mix", details)
