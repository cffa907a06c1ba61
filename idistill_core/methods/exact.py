"""Method ``exact``: every pool sample is a landmark (its exact gradient), no propagation: what ID approximates.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from idistill_core.methods.base import SelectionContext, SelectionReport
from idistill_core.pipeline.gradients import compute_gradients
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.pipeline.selection import SelectionOutcome, cap_options, select_samples
from idistill_core.steps.influence import landmark_values


def exact_outcome(
    grad_model, tokenizer, pool_examples, target_grads: torch.Tensor, budget: int, recipe: SelectionRecipe,
    preconditioner=None, aggregate: str | None = None, method: str = "exact", progress: bool = False,
    source_of: Mapping[str, str] | None = None,
) -> SelectionOutcome:
    """Every pool sample is a landmark: exact gradients for all N, no propagation (the reference ID approximates)."""
    aggregate = aggregate or recipe.aggregate
    pool = compute_gradients(grad_model, tokenizer, pool_examples, None, recipe.gradients, preconditioner, progress)
    pool_grads = pool.grads
    if recipe.center:
        from idistill_core.steps.influence import center_gradients

        mean = pool_grads.mean(dim=0)  # exact knows every pool gradient: centre on the pool mean
        pool_grads, target_grads = center_gradients(pool_grads, mean), center_gradients(target_grads, mean)
    values = landmark_values(pool_grads, target_grads, aggregate)
    return select_samples(
        pool.sample_ids, values, budget, aggregate, recipe.seed, method=method,
        **cap_options(pool.sample_ids, recipe.per_source_cap, source_of),
    )


def select(ctx: SelectionContext) -> SelectionReport:
    """Exact first-order influence of every pool sample (one gradient each), then the recipe's selection."""
    grad_model, preconditioner = ctx.gradient_model()
    with ctx.timed("target_gradients"):
        targets = compute_gradients(grad_model, ctx.tokenizer, ctx.targets, None, ctx.recipe.gradients, progress=ctx.progress)
    with ctx.timed("pool_gradients"):
        outcome = exact_outcome(
            grad_model, ctx.tokenizer, ctx.pool, targets.grads, ctx.budget, ctx.recipe, preconditioner,
            method="exact", progress=ctx.progress, source_of=ctx.source_of,
        )
    return ctx.report(outcome)
