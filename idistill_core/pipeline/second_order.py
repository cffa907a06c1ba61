"""Second order over artefacts: landmark ``p``/``Q`` from the model and the pool QP lifted by the coefficients.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from idistill_core.data.batch import batches_for
from idistill_core.errors import ConfigError
from idistill_core.pipeline.propagation import CoefficientTable
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.pipeline.selection import SelectionOutcome
from idistill_core.steps.qp import PoolQPConfig

logger = logging.getLogger("idistill")


def second_order_terms_for(
    model, tokenizer, pool_examples, target_examples, landmark_ids: Sequence[str], recipe: SelectionRecipe,
    preconditioner=None, on_progress: Callable[[str], None] | None = None,
) -> dict:
    """Landmark ``p`` (L,) and ``Q`` (L, L) of the quadratic model of the mean target loss after one step.

    Sketched (``influence.sketched_second_order_terms``): the landmark directions and target gradient are first
    order's (unit-normalised, ⊙ the Adam factor with a preconditioner, projected by ``recipe.gradients``), and
    only projected gradients and projected Hessian-vector products are kept, so memory is O(L · P), and η → 0
    gives back the first-order landmark values. The Hessian is that of ``recipe.hessian_targets`` target samples
    (seeded by ``recipe.seed``), whose graphs are what the memory holds beyond the model. Progress (a line per
    ~5% of the landmarks, with the rate) goes to ``on_progress`` (default: this module's logger).
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
    )
    return {
        "p": terms.p.detach().double().numpy(),
        "q": terms.q.detach().double().numpy(),
        "lr": np.array([terms.lr]),
        "num_source": np.array([terms.num_source]),
    }

def qp_outcome(
    ids: Sequence[str] | None,
    coefficients: np.ndarray | CoefficientTable,
    second: dict,
    budget: int,
    recipe: SelectionRecipe,
    qp: PoolQPConfig | None = None,
) -> SelectionOutcome:
    """Second-order weights over the whole pool: lift landmark terms with the KRR coefficients C (N, L)
    (g_i ≈ Σ_j C_ij g_j, so p_pool = C p_L and Q_pool = C Q_L Cᵀ, never formed) and solve the QP with a
    binary search on λ for exactly ``budget`` non-zero weights.

    ``coefficients`` is an in-memory ``(N, L)`` matrix (rows in ``ids`` order) or the coefficient table itself
    (``ids`` None: the table's order); ``qp`` says whether the table is read into float32 memory or streamed per
    product, and the product dtype (``influence.PoolQPConfig``; no N × L float64 copy either way)."""
    from idistill_core.steps.qp import pool_terms, qp_weights
    from idistill_core.steps.second_order import SecondOrderTerms

    if not hasattr(coefficients, "iter_chunks"):  # a matrix (a CoefficientTable streams itself)
        coefficients = torch.from_numpy(np.asarray(coefficients))
    terms = SecondOrderTerms(
        p=torch.from_numpy(np.asarray(second["p"], dtype=np.float64)),
        q=torch.from_numpy(np.asarray(second["q"], dtype=np.float64)),
        lr=float(np.asarray(second["lr"]).reshape(-1)[0]),
        num_source=int(np.asarray(second["num_source"]).reshape(-1)[0]),
    )
    p_pool, quad = pool_terms(coefficients, terms, qp)
    if quad.ids is not None:
        if ids is not None and list(ids) != quad.ids:
            raise ConfigError("qp_outcome: ids differ from the coefficient table's row order.")
        ids = quad.ids
    if ids is None or len(ids) != quad.n:
        got = None if ids is None else len(ids)
        raise ConfigError(f"qp_outcome: need one id per coefficient row ({quad.n}); got {got}.")
    from idistill_core.steps.select import select_from_weights

    weights = qp_weights(p_pool, quad, terms.lr, budget).double().numpy()
    ids = list(ids)
    # the λ search may not reach exactly k non-zeros (ties, convexity floor): keep the k largest, renormalise
    selection = select_from_weights(ids, weights, budget)
    keep = np.zeros(len(ids), dtype=bool)
    index = {s: i for i, s in enumerate(ids)}
    keep[[index[s] for s in selection.sample_ids]] = True
    weights = np.where(keep, weights, 0.0)
    weights *= len(ids) / weights.sum()
    return SelectionOutcome(ids, p_pool.numpy(), weights, list(selection.sample_ids), "id-second-order")
