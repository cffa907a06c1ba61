"""Method ``rds``: RDS+ (Ivison et al. 2025; paper §9.3): cosine of position-weighted mean final hidden states,
round-robin over the target samples. One forward per pool sample, computed once per pool (``rds_features``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from idistill_core.data.batch import TokenBatch, batches_for, in_order
from idistill_core.errors import DataError, NumericalError
from idistill_core.methods.base import SelectionContext, SelectionReport
from idistill_core.pipeline.selection import select_samples
from idistill_core.steps.embed import pooled_final_hidden


@torch.no_grad()
def rds_embeddings(model: torch.nn.Module, batches: Iterable[TokenBatch]) -> tuple[list[str], torch.Tensor]:
    """RDS+ embeddings (paper §9.3): final-layer hidden states, position-weighted mean, unit norm
    (``steps.embed.pooled_final_hidden``, which the default JVP embedding also appends).

    Args:
        model: a HF causal LM whose ``base_model`` is the decoder stack (Llama, Qwen2, ...).
        batches: right-padded batches.

    Returns:
        ``(ids, (n, hidden) float32)``.
    """
    was_training = model.training
    model.eval()
    ids: list[str] = []
    rows: list[torch.Tensor] = []
    try:
        for batch in batches:
            # the decoder alone: no lm_head logits computed only to be thrown away (a full forward costs 1.21x)
            rows.append(pooled_final_hidden(model, batch))
            ids.extend(batch.sample_ids)
    finally:
        model.train(was_training)
    if not rows:
        return ids, torch.empty(0, 0)
    return ids, torch.cat(rows)


def rds_scores(
    model: torch.nn.Module, pool_batches: Iterable[TokenBatch], target_batches: Iterable[TokenBatch]
) -> tuple[list[str], np.ndarray]:
    """RDS+ cosine similarities ``(N, T)`` between pool and target embeddings (paper §9.3).

    Targets are embedded first (``T`` is small); the pool is streamed batch by batch.

    Returns:
        ``(pool ids, (N, T) float32)``; select with ``select.round_robin``.
    """
    target_ids, targets = rds_embeddings(model, target_batches)
    if not target_ids:
        raise DataError("target_batches is empty")
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for batch in pool_batches:
        batch_ids, emb = rds_embeddings(model, [batch])
        ids.extend(batch_ids)
        parts.append((emb @ targets.T).numpy())
    if not ids:
        raise DataError("pool_batches is empty")
    return ids, np.concatenate(parts).astype(np.float32)


def rds_scores_from_features(
    pool_features: np.ndarray | torch.Tensor, target_features: np.ndarray | torch.Tensor
) -> np.ndarray:
    """RDS+ cosines ``(N, T) float32`` from precomputed unit-norm embeddings (:func:`rds_embeddings` rows).

    The pool side is target-independent, so it is computed once per pool and model and stored; only the few
    target embeddings are computed per target. Same product as :func:`rds_scores`.
    """
    pool = torch.as_tensor(np.asarray(pool_features, dtype=np.float32))
    targets = torch.as_tensor(np.asarray(target_features, dtype=np.float32))
    if pool.ndim != 2 or targets.ndim != 2 or pool.shape[0] == 0 or targets.shape[0] == 0:
        raise DataError(
            f"RDS+ features must be non-empty (N, H) and (T, H); got {tuple(pool.shape)} and {tuple(targets.shape)}"
        )
    if pool.shape[1] != targets.shape[1]:
        raise DataError(f"pool RDS+ features have H={pool.shape[1]}; target features have H={targets.shape[1]}")
    if not bool(torch.isfinite(pool).all()):
        raise NumericalError(f"pool RDS+ features have a non-finite value in row {int((~torch.isfinite(pool)).any(dim=1).nonzero()[0])}")
    return (pool @ targets.T).numpy().astype(np.float32)


def select(ctx: SelectionContext) -> SelectionReport:
    """RDS+: pool features (``ctx.pool_features`` when precomputed, else one forward each here), target features
    in file order, cosine, round-robin over the targets in that fixed order (as RDS+'s code visits them)."""
    ids = ctx.pool_ids
    with ctx.timed("baseline"):
        features = ctx.pool_features
        if features is None:
            got, computed = rds_embeddings(ctx.model, batches_for(ctx.pool, ctx.tokenizer, ctx.recipe.batch_size))
            features = in_order(ids, got, computed.numpy())  # batches were length-bucketed
        if np.shape(features)[0] != len(ids):
            raise DataError(f"pool_features has {np.shape(features)[0]} rows for a pool of {len(ids)}")
        target_ids, targets = rds_embeddings(
            ctx.model, batches_for(ctx.targets, ctx.tokenizer, ctx.recipe.batch_size, bucket=False)
        )
        if not target_ids:
            raise DataError("the target set has no usable samples for RDS+")
        cosine = rds_scores_from_features(features, targets)
        outcome = select_samples(
            ids, cosine, ctx.budget, aggregate="rr", seed=ctx.recipe.seed, method="rds", fixed_order=True,
            **ctx.caps(ids),
        )
    return ctx.report(outcome)
