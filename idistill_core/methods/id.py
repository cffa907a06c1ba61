"""Method ``id``: Influence Distillation proper (paper §2–§5): embeddings → landmarks → landmark influence →
propagation → selection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from idistill_core.errors import ConfigError
from idistill_core.methods.base import SelectionContext, SelectionReport
from idistill_core.pipeline.embeddings import embed_pool, open_store
from idistill_core.pipeline.gradients import compute_gradients
from idistill_core.pipeline.landmarks import adaptive_round, choose_landmarks
from idistill_core.pipeline.propagation import (
    CoefficientTable,
    coefficient_fidelity,
    keep_exact,
    shared_coefficients,
)
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.pipeline.second_order import qp_outcome, second_order_terms_for
from idistill_core.pipeline.selection import SelectionOutcome, cap_options, select_samples
from idistill_core.steps.influence import center_gradients, landmark_values

logger = logging.getLogger("idistill")


def landmark_outcome(
    coefficients: CoefficientTable,
    landmark_ids: Sequence[str],
    lm_values: np.ndarray,
    holdout_ids: Sequence[str],
    ho_values: np.ndarray,
    budget: int,
    recipe: SelectionRecipe,
    aggregate: str | None = None,
    second_order: dict | None = None,
    source_of: Mapping[str, str] | None = None,
) -> tuple[SelectionOutcome, float | None, dict[str, float]]:
    """Influence Distillation proper: propagate landmark influence to the pool (``C · V`` with the shared
    coefficients of exactly that pool, no refit), then select.

    Returns the outcome, the fidelity (Spearman ρ on held-out samples, None without them) and stage timings.
    ``second_order`` = {"p": (L,), "q": (L, L)} switches selection to the QP weights (paper §1.4).
    """
    aggregate = aggregate or recipe.aggregate
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if list(landmark_ids) != coefficients.landmark_ids:
        raise ConfigError("the landmark values' landmarks differ from those the propagation coefficients were built for.")
    ids, scores = coefficients.propagate(lm_values)
    scores = keep_exact(ids, scores, [*landmark_ids, *holdout_ids], [lm_values, ho_values])
    timings["propagation"] = time.perf_counter() - start
    rho = None
    if len(holdout_ids) >= 3:
        rho = coefficient_fidelity(coefficients, lm_values, holdout_ids, ho_values)
    start = time.perf_counter()
    if second_order is not None:
        # the table itself: PoolQPConfig decides float32 in memory or streamed, never an N × L float64 copy
        outcome = qp_outcome(None, coefficients, second_order, budget, recipe)
    else:
        outcome = select_samples(
            ids, scores, budget, aggregate, recipe.seed, method="id", **cap_options(ids, recipe.per_source_cap, source_of)
        )
    timings["selection"] = time.perf_counter() - start
    return outcome, rho, timings


@dataclass
class LandmarkSet:
    """The landmarks with their exact gradients and influence values, and the held-out samples' values."""

    ids: list[str]
    grads: torch.Tensor
    """``(L, P)`` the gradients the values come from (centred when ``recipe.center``)."""
    values: np.ndarray
    """``(L, T)`` landmark influence (``T = 1`` with ``aggregate='mean'``)."""
    holdout_ids: list[str]
    holdout_values: np.ndarray


def check(ctx: SelectionContext) -> None:
    """Refuse before anything is embedded or written."""
    recipe = ctx.recipe
    if ctx.backend is not None and ctx.backend.name != "local" and recipe.optimizer == "adam":
        # workers load `source` (the base weights); the warmed copy lives only in this process
        raise ConfigError(f"optimizer='adam' is not supported with backend '{ctx.backend.name}' in run_selection; "
                          "use the Dagster assets (the warmed checkpoint is loaded by the workers there).")
    if recipe.num_landmarks > len(ctx.pool):
        raise ConfigError(f"num_landmarks={recipe.num_landmarks} exceeds the pool size N={len(ctx.pool)}; choose L <= N.")


def select(ctx: SelectionContext) -> SelectionReport:
    """Target gradients → pool embeddings → landmarks → landmark influence → propagation → selection."""
    recipe = ctx.recipe
    grad_model, preconditioner = ctx.gradient_model()
    with ctx.timed("target_gradients"):
        target_grads = compute_gradients(
            grad_model, ctx.tokenizer, ctx.targets, None, recipe.gradients, progress=ctx.progress
        ).grads
    store = open_store(ctx.store_uri, ctx.store_table, ctx.model_fingerprint, recipe, ctx.model.config.hidden_size)
    with ctx.timed("embeddings"):
        embed_pool(
            ctx.model, ctx.tokenizer, ctx.pool, store, recipe.embed, commit_every=ctx.commit_every,
            progress=ctx.progress, on_commit=ctx.on_commit, backend=ctx.backend, source=ctx.source,
        )
    landmarks = landmark_set(ctx, store, grad_model, preconditioner, target_grads)
    second = None
    if recipe.order == "second":
        with ctx.timed("second_order"):
            second = second_order_terms_for(
                grad_model, ctx.tokenizer, ctx.pool, ctx.targets, landmarks.ids, recipe, preconditioner
            )
    with ctx.timed("coefficients"):
        coefficients, built = shared_coefficients(
            store, ctx.pool_ids, landmarks.ids, recipe.propagate, landmark_grads=landmarks.grads
        )
    outcome, rho, stage_times = landmark_outcome(
        coefficients, landmarks.ids, landmarks.values, landmarks.holdout_ids, landmarks.holdout_values, ctx.budget,
        recipe, second_order=second, source_of=ctx.source_of,
    )
    ctx.timings.update(stage_times)
    return ctx.report(
        outcome, sizes={"landmarks": len(landmarks.ids), "holdout": len(landmarks.holdout_ids)}, fidelity=rho,
        propagation=built.summary(), kernel_selection=built.selection,
    )


def landmark_set(ctx: SelectionContext, store, grad_model, preconditioner, target_grads: torch.Tensor) -> LandmarkSet:
    """Choose the landmarks (and held-out samples), compute their exact gradients and influence values; with
    ``strategy='adaptive'`` add the second round near the top-k cut of the first round's estimate."""
    recipe, pool_ids = ctx.recipe, ctx.pool_ids
    emb = store.read(pool_ids) if recipe.landmarks.needs_embeddings else None
    lm_ids, ho_ids = choose_landmarks(pool_ids, recipe.num_landmarks, recipe.num_holdout, recipe.seed, recipe.landmarks, emb)

    def gradients(ids: list[str]) -> torch.Tensor:
        return compute_gradients(
            grad_model, ctx.tokenizer, ctx.pool, ids, recipe.gradients, preconditioner, ctx.progress,
            backend=ctx.backend, source=ctx.source,
        ).grads

    with ctx.timed("landmark_gradients"):
        grads = gradients(lm_ids + ho_ids)
    lm_grads, ho_grads = grads[: len(lm_ids)], grads[len(lm_ids) :]
    mean = lm_grads.mean(dim=0) if recipe.center else None  # ID only knows its landmarks' gradients

    def centred(g: torch.Tensor) -> torch.Tensor:
        return g if mean is None else center_gradients(g, mean)

    lm_grads, ho_grads, target_grads = centred(lm_grads), centred(ho_grads), centred(target_grads)
    lm_values = landmark_values(lm_grads, target_grads, recipe.aggregate)
    ho_values = landmark_values(ho_grads, target_grads, recipe.aggregate)
    if recipe.landmarks.strategy == "adaptive" and len(lm_ids) < recipe.num_landmarks:
        extra: list[torch.Tensor] = []

        def second_round_values(ids: list[str]) -> np.ndarray:
            g = centred(gradients(ids))
            extra.append(g)  # kernel selection needs every landmark's gradient
            return landmark_values(g, target_grads, recipe.aggregate)

        with ctx.timed("landmark_gradients"):
            lm_ids, lm_values = adaptive_round(
                store, pool_ids, lm_ids, lm_values, ho_ids, ctx.budget, recipe, second_round_values,
                landmark_grads=lm_grads,
            )
        lm_grads = torch.cat([lm_grads, *extra])
    return LandmarkSet(list(lm_ids), lm_grads, lm_values, list(ho_ids), ho_values)
