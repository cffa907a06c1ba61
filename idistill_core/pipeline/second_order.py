"""Second order over artefacts: landmark ``p``/``Q`` from the model and the pool QP lifted by the coefficients.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from idistill_core.data.batch import batches_for
from idistill_core.errors import ConfigError
from idistill_core.pipeline.propagation import CoefficientTable
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.pipeline.selection import SelectionOutcome, cap_options, uniform_weights
from idistill_core.steps.pool_qp import PoolQPConfig
from idistill_core.steps.second_order import SecondOrderTerms

logger = logging.getLogger("idistill")

CURVE_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
"""Budgets of the budget curve, as fractions of the pool (the selection's own budget is added)."""


def second_order_terms_for(
    model, tokenizer, pool_examples, target_examples, landmark_ids: Sequence[str], recipe: SelectionRecipe,
    preconditioner=None, on_progress: Callable[[str], None] | None = None,
) -> dict:
    """Landmark ``p`` (L,) and ``Q`` (L, L) of the paper's quadratic model of the mean target loss after one step
    of size ``recipe.lr`` (``steps.second_order.sketched_second_order_terms``: the real step's scale, exact ``p``
    and diagonal, ``Q``'s pairs from two averaged sketches of ``recipe.hessian_proj_dim`` rows).

    The Hessian is that of ``recipe.hessian_targets`` target samples (seeded by ``recipe.seed``), whose graphs
    are what the memory holds beyond the model. Progress (a line per ~5% of the landmarks, with the rate) goes
    to ``on_progress`` (default: this module's logger). Returns arrays: ``p``, ``q``, ``p_first``, and
    one-element ``lr``, ``num_source``, ``constant``, ``constant_first``, ``target_loss``, ``q_noise``.
    """
    from idistill_core.steps.second_order import sketched_second_order_terms

    report = on_progress or logger.info
    total, every, start = len(landmark_ids), max(1, len(landmark_ids) // 20), time.perf_counter()

    def on_landmark(done: int) -> None:
        if done % every == 0 or done == total:
            rate = (time.perf_counter() - start) / done
            report(f"second order: {done}/{total} landmarks ({rate:.1f} s each, ~{rate * (total - done) / 60:.0f} min left)")

    target_ids = list(target_examples["sample_id"])
    hessian = None
    if recipe.hessian_targets is not None and recipe.hessian_targets < len(target_ids):
        rng = np.random.default_rng(recipe.seed)
        picked = sorted(rng.choice(len(target_ids), size=recipe.hessian_targets, replace=False).tolist())
        hessian = batches_for(target_examples, tokenizer, 1, ids=[target_ids[i] for i in picked])
    terms = sketched_second_order_terms(
        model,
        batches_for(pool_examples, tokenizer, 1, ids=landmark_ids),
        batches_for(target_examples, tokenizer, 1),  # one at a time: a batch's activations would set the peak
        recipe.gradients,
        preconditioner=preconditioner,
        lr=recipe.lr,
        hessian_batches=hessian,
        on_landmark=on_landmark,
        hessian_proj_dim=recipe.hessian_proj_dim,
    )
    return terms_to_arrays(terms)


def terms_to_arrays(terms: SecondOrderTerms) -> dict[str, np.ndarray]:
    """``SecondOrderTerms`` as the arrays the ``landmark_influence`` artefact stores (and :func:`terms_from_arrays`
    reads back)."""
    out = {"p": terms.p.detach().double().numpy(), "q": terms.q.detach().double().numpy()}
    out["p_first"] = (terms.p if terms.p_first is None else terms.p_first).detach().double().numpy()
    for name in ("lr", "num_source", "constant", "constant_first", "target_loss", "q_noise"):
        out[name] = np.array([float(getattr(terms, name))])
    return out


def terms_from_arrays(arrays: dict) -> SecondOrderTerms:
    """The inverse of :func:`terms_to_arrays`; missing scalars (older artefacts) take their defaults."""

    def scalar(name: str, default: float) -> float:
        return float(np.asarray(arrays[name]).reshape(-1)[0]) if name in arrays else default

    return SecondOrderTerms(
        p=torch.from_numpy(np.asarray(arrays["p"], dtype=np.float64)),
        q=torch.from_numpy(np.asarray(arrays["q"], dtype=np.float64)),
        lr=scalar("lr", 0.0),
        num_source=int(scalar("num_source", len(arrays["p"]))),
        constant=scalar("constant", 0.0),
        p_first=torch.from_numpy(np.asarray(arrays["p_first"], dtype=np.float64)) if "p_first" in arrays else None,
        constant_first=scalar("constant_first", 0.0),
        target_loss=scalar("target_loss", float("nan")),
        q_noise=scalar("q_noise", 0.0),
    )


class _ExactRows:
    """A coefficient source whose landmark rows are unit rows ``e_j``: the pool terms are exact there
    (``p_pool = p_L``, ``Q_pool``'s landmark block ``= Q_L``), as first order keeps landmarks' exact values."""

    def __init__(self, table: CoefficientTable, landmark_ids: Sequence[str]):
        self._table = table
        self._column = {s: j for j, s in enumerate(landmark_ids)}
        self.num_landmarks = table.num_landmarks

    def count(self) -> int:
        return self._table.count()

    def iter_chunks(self, batch_rows: int = 16384):
        for chunk_ids, block in self._table.iter_chunks(batch_rows):
            rows = [(i, self._column[s]) for i, s in enumerate(chunk_ids) if s in self._column]
            if rows:
                block = np.array(block, copy=True)
                for i, j in rows:
                    block[i] = 0.0
                    block[i, j] = 1.0
            yield chunk_ids, block


def qp_outcome(
    ids: Sequence[str] | None,
    coefficients: np.ndarray | CoefficientTable,
    second: dict,
    budget: int,
    recipe: SelectionRecipe,
    qp: PoolQPConfig | None = None,
    landmark_ids: Sequence[str] | None = None,
    source_of: Mapping[str, str] | None = None,
) -> SelectionOutcome:
    """Second-order weights over the whole pool: lift landmark terms with the KRR coefficients C (N, L)
    (g_i ≈ Σ_j C_ij g_j, so p_pool = C p_L and Q_pool = C Q_L Cᵀ, never formed) and solve the QP with a
    binary search on λ for exactly ``budget`` non-zero weights.

    ``coefficients`` is an in-memory ``(N, L)`` matrix (rows in ``ids`` order) or the coefficient table itself
    (``ids`` None: the table's order). ``steps.pool_qp.solve_pool_qp`` solves it on a working set of rows checked against
    the whole pool's optimality conditions, a few passes over the table in all (``qp``: ``PoolQPConfig``; no
    N × L float64 copy either way; ``details`` report the passes, rounds and working rows). With
    ``landmark_ids`` (the columns of C, in order) the landmarks' rows are unit rows: their terms are exact.

    The outcome ranks by the QP weights (``scores`` are the weights; ``details['p_pool']`` the lifted linear term).
    ``recipe.per_source_cap`` (sources from ``source_of``) is honoured when the support is read off the weights:
    the ``budget`` largest weights within the cap; when the cap moves the support the weights are spread
    uniformly over the picks (the QP's weights were for another support).
    """
    from idistill_core.steps.pool_qp import solve_pool_qp
    from idistill_core.steps.select import select_top_k

    if not hasattr(coefficients, "iter_chunks"):  # a matrix (a CoefficientTable streams itself)
        coefficients = torch.from_numpy(np.array(coefficients))  # a copy: landmark rows are replaced below
        if landmark_ids is not None:
            if ids is None:
                raise ConfigError("qp_outcome: an in-memory coefficient matrix needs ids to keep landmark rows exact.")
            row = {s: i for i, s in enumerate(ids)}
            for j, s in enumerate(landmark_ids):
                if s in row:
                    coefficients[row[s]] = 0.0
                    coefficients[row[s], j] = 1.0
    elif landmark_ids is not None:
        if list(landmark_ids) != coefficients.landmark_ids:
            raise ConfigError("qp_outcome: landmark_ids differ from the coefficient table's landmarks.")
        coefficients = _ExactRows(coefficients, landmark_ids)
    terms = terms_from_arrays(second)
    if ids is not None and not hasattr(coefficients, "iter_chunks") and len(ids) != coefficients.shape[0]:
        raise ConfigError(f"qp_outcome: need one id per coefficient row ({coefficients.shape[0]}); got {len(ids)}.")
    result = solve_pool_qp(coefficients, terms, budget, config=qp)
    p_pool, solution = result.p_pool, result.solution
    if result.ids is not None:
        if ids is not None and list(ids) != result.ids:
            raise ConfigError("qp_outcome: ids differ from the coefficient table's row order.")
        ids = result.ids
    if ids is None or len(ids) != result.n:
        got = None if ids is None else len(ids)
        raise ConfigError(f"qp_outcome: need one id per coefficient row ({result.n}); got {got}.")
    ids = list(ids)
    weights = solution.weights.double().numpy()
    caps = cap_options(ids, recipe.per_source_cap, source_of)
    # the λ search may not reach exactly k non-zeros (ties, convexity floor): keep the k largest, renormalise
    picked = list(select_top_k(ids, weights, budget, **caps).sample_ids)
    uncapped = list(select_top_k(ids, weights, budget).sample_ids) if caps else picked
    keep = np.zeros(len(ids), dtype=bool)
    index = {s: i for i, s in enumerate(ids)}
    keep[[index[s] for s in picked]] = True
    if picked != uncapped or not (weights[keep] > 0).all():
        weights = uniform_weights(ids, picked)
    else:
        weights = np.where(keep, weights, 0.0)
        weights *= len(ids) / weights.sum()
    total = float(len(ids))
    w = torch.from_numpy(weights)
    p_first = terms.p if terms.p_first is None else terms.p_first
    details = {
        "p_pool": p_pool.numpy(), "lambda": solution.lam, "exact_support": solution.exact, "q_noise": terms.q_noise,
        "predicted_change": terms.constant + terms.lr / total * float(-(p_pool @ w) + 0.5 * terms.lr * result.quadratic(w)),
        "first_order_change": terms.constant_first - terms.lr / total * float(p_first.to(torch.float64) @ result.coefficient_sum(w)),
        "qp_solver": result.solver, "qp_passes": result.passes, "qp_rounds": result.rounds,
        "qp_working_rows": result.working_rows,
    }
    config = qp or PoolQPConfig()
    if len(ids) * terms.q.shape[0] * 4 <= config.memory_limit_mib * 2**20:
        details["budget_curve"] = budget_curve(coefficients, terms, budget, config, p_pool)
    else:  # each budget is another solve; streamed from the table, that is passes over N·L per point
        logger.info("budget curve skipped: the coefficients (%d x %d) do not fit PoolQPConfig.memory_limit_mib",
                    len(ids), terms.q.shape[0])
    return SelectionOutcome(ids, weights, weights, picked, "id-second-order", details)


def budget_curve(
    coefficients, terms: SecondOrderTerms, budget: int, qp: PoolQPConfig, p_pool: torch.Tensor | None = None
) -> list[dict]:
    """``steps.qp.budget_curve`` on the pool: the model's predicted target-loss change at the pool QP's best
    weights for each budget of ``CURVE_FRACTIONS`` of the pool (and ``budget``), beside first order's prediction
    at its own top-k weights (``BudgetPoint`` fields and ``fraction``). The caller keeps this to pools whose
    coefficients fit in memory: every budget is a full QP over ``Q_pool = C M Cᵀ``. ``p_pool``: the lifted linear
    term when the caller has it (the pool QP returns it), so ``C`` is not multiplied again.
    """
    import dataclasses

    from idistill_core.steps.pool_qp import PoolQuadratic, pool_terms
    from idistill_core.steps.qp import budget_curve as curve_of

    if p_pool is None:
        p_pool, quad = pool_terms(coefficients, terms, qp)
    else:
        quad = PoolQuadratic(coefficients, terms, qp)
    n = quad.n
    p_first = p_pool if terms.p_first is None else quad.matvec(terms.p_first.detach().to(torch.float64))
    budgets = sorted({max(1, min(n, round(f * n))) for f in CURVE_FRACTIONS} | {min(budget, n)})
    points = curve_of(p_pool, quad, terms.lr, budgets, float(n), terms.constant, p_first, terms.constant_first)
    return [{**dataclasses.asdict(pt), "fraction": pt.k / n} for pt in points]
