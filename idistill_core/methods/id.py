"""Method ``id``: Influence Distillation proper (paper §2–§5): embeddings → landmarks → landmark influence →
propagation → selection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from idistill_core.errors import ConfigError
from idistill_core.methods.base import SelectionContext, SelectionReport
from idistill_core.pipeline.embeddings import embed_pool, open_store
from idistill_core.pipeline.gradients import compute_gradients
from idistill_core.pipeline.landmarks import adaptive_round, choose_landmarks
from idistill_core.pipeline.propagation import CoefficientTable, keep_exact, shared_coefficients, spearman
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.pipeline.refinement import nearest_to_targets, refined_scores
from idistill_core.pipeline.second_order import qp_outcome, second_order_terms_for
from idistill_core.pipeline.selection import SelectionOutcome, cap_options, select_samples
from idistill_core.steps.influence import center_gradients, landmark_values
from idistill_core.steps.propagate import PropagateConfig
from idistill_core.store.lance import EmbeddingStore

logger = logging.getLogger("idistill")


@dataclass
class Refinement:
    """A target's own landmarks (``pipeline.refinement``): ids and exact values ``(R, T)``, computed like the
    shared landmarks' (same centring and aggregation)."""

    ids: list[str]
    values: np.ndarray


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
    refinement: Refinement | None = None,
    store: EmbeddingStore | None = None,
    propagate: PropagateConfig | None = None,
) -> tuple[SelectionOutcome, float | None, dict[str, float]]:
    """Influence Distillation proper: propagate landmark influence to the pool (``C · V`` with the shared
    coefficients of exactly that pool, no refit; with a ``refinement``, the KRR extended to the target's own
    landmarks, which needs the ``store`` of the embeddings), keep every exactly known value, then select.

    Returns the outcome, the fidelity (Spearman ρ of the propagated against the exact values on held-out
    samples, None with fewer than 3) and stage timings. ``second_order`` = {"p": (L,), "q": (L, L), ...} switches
    selection to the QP weights (paper §1.4; the refinement is first order's). ``propagate``: the config the
    coefficients were built with (default ``recipe.propagate``; pass the chosen one when it had ``auto`` fields).
    """
    aggregate = aggregate or recipe.aggregate
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if list(landmark_ids) != coefficients.landmark_ids:
        raise ConfigError("the landmark values' landmarks differ from those the propagation coefficients were built for.")
    exact_ids, exact_values = [*landmark_ids, *holdout_ids], [lm_values, ho_values]
    if refinement is not None and refinement.ids:
        if store is None:
            raise ConfigError("landmark_outcome: refinement landmarks need the embedding store.")
        ids, scores = refined_scores(
            store, coefficients, None, lm_values, refinement.ids, refinement.values, propagate or recipe.propagate
        )
        exact_ids, exact_values = [*exact_ids, *refinement.ids], [*exact_values, refinement.values]
    else:
        ids, scores = coefficients.propagate(lm_values)
    rho = None
    if len(holdout_ids) >= 3:
        position = {s: i for i, s in enumerate(ids)}
        predicted = np.asarray(scores, dtype=np.float64)[[position[s] for s in holdout_ids]]
        rho = spearman(predicted.mean(axis=1), np.asarray(ho_values).mean(axis=1))
    scores = keep_exact(ids, scores, exact_ids, exact_values)
    timings["propagation"] = time.perf_counter() - start
    start = time.perf_counter()
    if second_order is not None:
        # the table itself: PoolQPConfig decides float32 in memory or streamed, never an N × L float64 copy
        outcome = qp_outcome(
            None, coefficients, second_order, budget, recipe, landmark_ids=landmark_ids, source_of=source_of
        )
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
    targets: torch.Tensor
    """``(T, P)`` the target gradients the values are products with (centred like the landmarks')."""
    center: torch.Tensor | None = None
    """``(P,)`` the landmarks' mean gradient every gradient is centred on (None: ``recipe.center`` off)."""

    def values_of(self, grads: torch.Tensor, aggregate: str) -> np.ndarray:
        """Influence values of more samples' gradients, centred and aggregated like the landmarks'."""
        return _values(grads, self.center, self.targets, aggregate)

    def refinement(self, ids: list[str], grads: torch.Tensor, aggregate: str) -> Refinement:
        """The :class:`Refinement` of ``ids`` from their gradients ``(R, P)`` (rows in ``ids`` order)."""
        if not ids:
            return Refinement([], np.zeros((0, self.values.shape[1])))
        return Refinement(list(ids), self.values_of(grads, aggregate))


def influence_of(
    landmark_ids: Sequence[str], landmark_grads, holdout_ids: Sequence[str], holdout_grads, target_grads,
    recipe: SelectionRecipe,
) -> LandmarkSet:
    """The landmarks' and held-out samples' first-order values on a target from their gradients (the
    ``landmark_influence`` asset's step; :func:`landmark_set` chooses the landmarks first)."""
    lm = torch.as_tensor(np.asarray(landmark_grads))
    mean = lm.mean(dim=0) if recipe.center else None  # ID only knows its landmarks' gradients
    t = torch.as_tensor(np.asarray(target_grads))
    targets = t if mean is None else center_gradients(t, mean)
    values = _values(lm, mean, targets, recipe.aggregate)
    ho = torch.as_tensor(np.asarray(holdout_grads))
    holdout = _values(ho, mean, targets, recipe.aggregate) if len(holdout_ids) else np.zeros((0, values.shape[1]))
    centred = lm if mean is None else center_gradients(lm, mean)
    return LandmarkSet(list(landmark_ids), centred, values, list(holdout_ids), holdout, targets, mean)


def _values(grads: torch.Tensor, center: torch.Tensor | None, targets: torch.Tensor, aggregate: str) -> np.ndarray:
    return landmark_values(grads if center is None else center_gradients(grads, center), targets, aggregate)


Gradients = Callable[[list[str]], torch.Tensor]
"""``ids -> (len(ids), P)`` exact sketched (preconditioned) gradients of pool samples."""


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
    """Target gradients → pool embeddings → landmarks → landmark influence → propagation (+ the target's own
    refinement landmarks) → selection."""
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

    def gradients(ids: list[str]) -> torch.Tensor:
        return compute_gradients(
            grad_model, ctx.tokenizer, ctx.pool, ids, recipe.gradients, preconditioner, ctx.progress,
            backend=ctx.backend, source=ctx.source,
        ).grads

    second = None
    if recipe.order == "second":
        def second(landmark_ids: list[str]) -> dict:
            return second_order_terms_for(
                grad_model, ctx.tokenizer, ctx.pool, ctx.targets, landmark_ids, recipe, preconditioner
            )

    target_emb = None
    if recipe.refine_landmarks and recipe.order == "first":
        with ctx.timed("refinement"):
            target_emb = target_embeddings(ctx.model, ctx.tokenizer, ctx.targets, recipe)
    return propagate_and_select(ctx, store, target_grads, gradients, target_emb, second)


def propagate_and_select(
    ctx: SelectionContext,
    store: EmbeddingStore,
    target_grads: torch.Tensor,
    gradients: Gradients,
    target_emb: np.ndarray | None = None,
    second_order: Callable[[list[str]], dict] | None = None,
) -> SelectionReport:
    """Everything of ``id`` after the embeddings and target gradients, given a way to get pool gradients (the
    benchmarks pass cached ones: the computation is deterministic per sample). ``target_emb`` ``(T, D)``: the
    target samples' JVP embeddings, for the refinement landmarks (None: no refinement)."""
    recipe = ctx.recipe
    landmarks = landmark_set(ctx, store, target_grads, gradients)
    second = None
    if second_order is not None:
        with ctx.timed("second_order"):
            second = second_order(landmarks.ids)
    with ctx.timed("coefficients"):
        coefficients, built = shared_coefficients(
            store, ctx.pool_ids, landmarks.ids, recipe.propagate, landmark_grads=landmarks.grads
        )
    refinement = None
    if target_emb is not None and recipe.refine_landmarks:
        with ctx.timed("refinement"):
            refinement = refine(ctx, store, landmarks, gradients, target_emb)
    outcome, rho, stage_times = landmark_outcome(
        coefficients, landmarks.ids, landmarks.values, landmarks.holdout_ids, landmarks.holdout_values, ctx.budget,
        recipe, second_order=second, source_of=ctx.source_of, refinement=refinement, store=store,
        propagate=built.config,
    )
    ctx.timings.update(stage_times)
    sizes = {"landmarks": len(landmarks.ids), "holdout": len(landmarks.holdout_ids)}
    if refinement is not None:
        sizes["refinement"] = len(refinement.ids)
    return ctx.report(
        outcome, sizes=sizes, fidelity=rho, propagation=built.summary(), kernel_selection=built.selection,
    )


def target_embeddings(model, tokenizer, targets, recipe: SelectionRecipe) -> np.ndarray:
    """``(T, D)`` JVP embeddings of the target samples (in their order), with the pool's embedder."""
    from idistill_core.data.batch import batches_for, in_order
    from idistill_core.steps.embed import embed_samples

    got, parts = [], []
    for ids, vectors in embed_samples(model, batches_for(targets, tokenizer, recipe.embed.batch_size), recipe.embed):
        got += list(ids)
        parts.append(vectors)
    return np.asarray(in_order(list(targets["sample_id"]), got, np.concatenate(parts)))


def refine(
    ctx: SelectionContext, store: EmbeddingStore, landmarks: LandmarkSet, gradients: Gradients, target_emb: np.ndarray
) -> Refinement:
    """The target's own ``recipe.refine_landmarks`` landmarks with exact values computed like the shared
    landmarks'."""
    ids = refine_ids(store, ctx.pool_ids, landmarks, target_emb, ctx.recipe.refine_landmarks)
    return landmarks.refinement(ids, gradients(ids) if ids else None, ctx.recipe.aggregate)


def refine_ids(
    store: EmbeddingStore, pool_ids: list[str], landmarks: LandmarkSet, target_emb: np.ndarray, count: int
) -> list[str]:
    """The pool samples nearest the target's dev samples in the embedding space, round-robin over the dev
    samples (``pipeline.refinement.nearest_to_targets``), never a shared landmark or held-out sample."""
    return nearest_to_targets(
        store.iter_chunks(sample_ids=pool_ids), target_emb, count, exclude=[*landmarks.ids, *landmarks.holdout_ids]
    )


def landmark_set(ctx: SelectionContext, store, target_grads: torch.Tensor, gradients: Gradients) -> LandmarkSet:
    """Choose the landmarks (and held-out samples), compute their exact gradients and influence values; with
    ``strategy='adaptive'`` add the second round near the top-k cut of the first round's estimate."""
    recipe, pool_ids = ctx.recipe, ctx.pool_ids
    emb = store.read(pool_ids) if recipe.landmarks.needs_embeddings else None
    lm_ids, ho_ids = choose_landmarks(pool_ids, recipe.num_landmarks, recipe.num_holdout, recipe.seed, recipe.landmarks, emb)
    with ctx.timed("landmark_gradients"):
        grads = gradients(lm_ids + ho_ids)
    landmarks = influence_of(lm_ids, grads[: len(lm_ids)], ho_ids, grads[len(lm_ids) :], target_grads, recipe)
    lm_values, mean, centred = landmarks.values, landmarks.center, landmarks.grads
    if recipe.landmarks.strategy == "adaptive" and len(lm_ids) < recipe.num_landmarks:
        extra: list[torch.Tensor] = []

        def second_round_values(ids: list[str]) -> np.ndarray:
            g = gradients(ids)
            extra.append(g if mean is None else center_gradients(g, mean))  # kernel selection needs every gradient
            return landmarks.values_of(g, recipe.aggregate)

        with ctx.timed("landmark_gradients"):
            lm_ids, lm_values = adaptive_round(
                store, pool_ids, lm_ids, lm_values, ho_ids, ctx.budget, recipe, second_round_values,
                landmark_grads=centred,
            )
        centred = torch.cat([centred, *extra])
    landmarks.ids, landmarks.grads, landmarks.values = list(lm_ids), centred, lm_values
    return landmarks
