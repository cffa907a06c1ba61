"""Comparison selectors (paper §9): random, RDS+, mid-perplexity, and LESS-style gradient cosine.

The forward-only baselines stream ``TokenBatch``es and keep only ``O(N · T)`` results. Selection for
RDS+ is ``select.round_robin`` over target columns; random is ``select.select_top_k`` of its scores.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from idistill_core.batch import TokenBatch
from idistill_core.errors import ConfigError, DataError, NumericalError
from idistill_core.select import Selection

logger = logging.getLogger("idistill")


def random_scores(sample_ids: Sequence[str], seed: int) -> np.ndarray:
    """Uniform ``[0, 1)`` scores ``(N,)`` derived from ``(seed, sample_id)``.

    A hash rather than an RNG stream, so a sample's score does not depend on row order or on the
    other samples; top-k of these is a uniform random subset.
    """
    out = np.empty(len(sample_ids), dtype=np.float64)
    for i, sid in enumerate(sample_ids):
        digest = hashlib.blake2b(f"{seed}\x00{sid}".encode(), digest_size=8).digest()
        out[i] = (int.from_bytes(digest, "big") >> 11) / float(1 << 53)
    return out


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def rds_embeddings(model: torch.nn.Module, batches: Iterable[TokenBatch]) -> tuple[list[str], torch.Tensor]:
    """RDS+ embeddings (paper §9.3): final-layer hidden states, position-weighted mean, unit norm.

    Token ``j`` (0-based, real tokens only) gets weight ``(j + 1) / Σ(j' + 1)``, as in SGPT weighted
    mean pooling. Right padding is masked out, so padding never changes an embedding.

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
            batch = batch.to(_device(model))
            # the decoder alone: its last_hidden_state is the final-normed output, and no lm_head logits
            # are computed only to be thrown away (a full forward costs 1.21x this one, BENCHMARKS.md)
            out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            hidden = out.last_hidden_state.float()  # (B, S, H)
            mask = batch.attention_mask.float()
            weights = torch.cumsum(mask, dim=1) * mask  # position + 1 on real tokens, 0 on padding
            weights = weights / weights.sum(dim=1, keepdim=True)
            pooled = (weights.unsqueeze(-1) * hidden).sum(dim=1)
            if not bool(torch.isfinite(pooled).all()):
                bad = int((~torch.isfinite(pooled)).any(dim=1).nonzero()[0])
                raise NumericalError(f"non-finite RDS embedding for sample '{batch.sample_ids[bad]}'")
            rows.append(F.normalize(pooled, dim=1).cpu())
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


@torch.no_grad()
def midppl_scores(model: torch.nn.Module, pool_batches: Iterable[TokenBatch]) -> tuple[list[str], np.ndarray]:
    """Per-sample NLL ``(N,)``: mean next-token loss over ALL real tokens, prompt included (paper §9.4).

    Matches the HF loss with ``labels = input_ids`` computed one sample at a time.

    Raises:
        DataError: a sample has fewer than two real tokens (no next-token prediction).
    """
    was_training = model.training
    model.eval()
    ids: list[str] = []
    parts: list[np.ndarray] = []
    try:
        for batch in pool_batches:
            batch = batch.to(_device(model))
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
            token_nll = F.cross_entropy(
                logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:], reduction="none"
            )
            mask = batch.attention_mask[:, 1:].float()
            counts = mask.sum(dim=1)
            if bool((counts == 0).any()):
                bad = batch.sample_ids[int((counts == 0).nonzero()[0])]
                raise DataError(f"sample '{bad}' has fewer than 2 tokens; mid-ppl needs a next-token loss")
            parts.append(((token_nll * mask).sum(dim=1) / counts).cpu().double().numpy())
            ids.extend(batch.sample_ids)
    finally:
        model.train(was_training)
    if not ids:
        raise DataError("pool_batches is empty")
    return ids, np.concatenate(parts)


def midppl_select(
    sample_ids: Sequence[str], nll: np.ndarray | torch.Tensor, k: int, skip_fraction: float = 0.33
) -> Selection:
    """Mid-perplexity band (CCDS, paper §9.4): sort by NLL descending, skip the top ``skip_fraction``,
    take the next ``k`` (ties by ``sample_id``).

    Raises:
        ConfigError: ``k`` < 1 or the band runs past the pool (``floor(N·skip) + k > N``).
    """
    values = np.asarray(
        nll.detach().cpu().numpy() if isinstance(nll, torch.Tensor) else nll, dtype=np.float64
    )
    n = len(sample_ids)
    if values.shape != (n,):
        raise DataError(f"nll has shape {values.shape}; expected ({n},)")
    if not 0 <= skip_fraction < 1:
        raise ConfigError(f"skip_fraction must be in [0, 1); got {skip_fraction}")
    skip = int(np.floor(n * skip_fraction))
    if k < 1 or skip + k > n:
        raise ConfigError(f"k must be in [1, {n - skip}] (pool {n} minus the skipped top {skip}); got {k}")
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(f"nll is not finite for sample '{sample_ids[int(np.argmax(bad))]}'")
    id_rank = np.empty(n, dtype=np.int64)
    id_rank[sorted(range(n), key=lambda i: sample_ids[i])] = np.arange(n)
    order = np.lexsort((id_rank, -values))[skip : skip + k]
    return Selection([sample_ids[i] for i in order], values[order], "mid_ppl")


def less_scores(
    pool_grads: Iterable[tuple[list[str], torch.Tensor]],
    target_grads: torch.Tensor,
    target_groups: Sequence[str] | None = None,
    checkpoint_weights: Sequence[float] | None = None,
) -> tuple[list[str], np.ndarray]:
    """LESS score (paper §9.5; ``less/data_selection/matching.py``): the checkpoint-weighted sum of cosines of each
    pool feature with each target feature, averaged within each target group (sub-task), then the max over groups.

    ``score(z) = max_g mean_{t ∈ g} Σ_c w_c cos(pool_c(z), target_c(t))``; without ``checkpoint_weights`` there is
    one checkpoint and ``w = 1``.

    Args:
        pool_grads: stream of ``(ids, (B, P))``, or ``(ids, (B, C, P))`` with checkpoint weights (``less.adam_features``).
        target_grads: ``(T, P)``, or ``(C, T, P)`` with checkpoint weights.
        target_groups: ``T`` group names; None = one group (plain mean over targets).
        checkpoint_weights: ``C`` weights (LESS: each checkpoint's mean learning rate, not normalised).

    Returns:
        ``(ids, (N,) float64)``; select with ``select.select_top_k``.
    """
    if checkpoint_weights is None:
        if target_grads.ndim != 2 or target_grads.shape[0] == 0:
            raise DataError(f"target_grads must be (T, P) with T >= 1; got {tuple(target_grads.shape)}")
        target_grads = target_grads[None]
        weights = torch.ones(1, dtype=torch.float64)
    else:
        weights = torch.as_tensor(list(checkpoint_weights), dtype=torch.float64)
        if target_grads.ndim != 3 or target_grads.shape[1] == 0 or target_grads.shape[0] != len(weights):
            raise DataError(
                f"target_grads must be (C={len(weights)}, T >= 1, P) with checkpoint weights; "
                f"got {tuple(target_grads.shape)}"
            )
    num_targets = target_grads.shape[1]
    groups = ["all"] * num_targets if target_groups is None else list(target_groups)
    if len(groups) != num_targets:
        raise DataError(f"target_groups has {len(groups)} names for {num_targets} target gradients")
    names = sorted(set(groups))
    membership = torch.zeros(len(groups), len(names), dtype=torch.float64)
    for row, g in enumerate(groups):
        membership[row, names.index(g)] = 1.0
    membership /= membership.sum(dim=0, keepdim=True)  # column j averages group j's targets
    targets = F.normalize(target_grads.double(), dim=2)  # (C, T, P)
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for batch_ids, grads in pool_grads:
        grads = grads[:, None] if checkpoint_weights is None else grads
        if grads.ndim != 3 or grads.shape[1] != targets.shape[0] or grads.shape[2] != targets.shape[2]:
            raise DataError(
                f"pool features have shape {tuple(grads.shape)}; target features are (C, T, P) = "
                f"{tuple(targets.shape)}"
            )
        cos = torch.einsum("bcp,ctp->bct", F.normalize(grads.double(), dim=2), targets)
        weighted = torch.einsum("bct,c->bt", cos, weights)
        parts.append((weighted @ membership).max(dim=1).values.numpy())
        ids.extend(batch_ids)
    if not ids:
        raise DataError("pool_grads is empty")
    return ids, np.concatenate(parts)
