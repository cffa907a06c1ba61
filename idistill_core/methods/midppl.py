"""Method ``midppl``: the mid-perplexity band of the pool (CCDS; paper §9.4), target-agnostic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from idistill_core.data.batch import TokenBatch, batches_for, in_order
from idistill_core.errors import ConfigError, DataError
from idistill_core.methods.base import SelectionContext, SelectionReport
from idistill_core.pipeline.selection import SelectionOutcome, uniform_weights
from idistill_core.steps.select import Selection


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
            batch = batch.to(next(model.parameters()).device)
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


def select(ctx: SelectionContext) -> SelectionReport:
    """The mid-perplexity band of the pool under the base model (one forward per sample)."""
    ids = ctx.pool_ids
    with ctx.timed("baseline"):
        got, nll = midppl_scores(ctx.model, batches_for(ctx.pool, ctx.tokenizer, ctx.recipe.batch_size))
        nll = np.asarray(in_order(ids, list(got), nll), dtype=np.float64)
        picked = list(midppl_select(ids, nll, ctx.budget).sample_ids)
        outcome = SelectionOutcome(ids, nll, uniform_weights(ids, picked), picked, "midppl")
    return ctx.report(outcome)
