"""Step 2 over artefacts: exact gradients of chosen samples (landmarks, held-out, targets), resumable in shards,
and the Adam warm-up that preconditions them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from idistill_core import backends
from idistill_core.backends import BackendConfig, ModelSource
from idistill_core.data.batch import batches_for, in_order, iter_batches, pad_id
from idistill_core.errors import IdistillError
from idistill_core.steps.gradients import GradientConfig, GradientSet, collect_gradients, select_parameters
from idistill_core.steps.warmup import WarmupConfig


def compute_gradients(
    model, tokenizer, examples, ids: Sequence[str] | None, config: GradientConfig, preconditioner=None, progress: bool = False,
    backend: BackendConfig | None = None, source: ModelSource | None = None,
) -> GradientSet:
    """Projected, unit-normalised per-sample gradients for ``ids`` of ``examples`` (all rows when None).

    ``backend`` other than local computes them there (workers load ``source``), returned in the order of ``ids``.
    """
    if backend is not None and backend.name != "local":
        ids = list(examples["sample_id"]) if ids is None else list(ids)
        rows: dict[str, np.ndarray] = {}
        stream = backends.gradient_stream(backend, model, source, examples, ids, pad_id(tokenizer), config, preconditioner)
        for batch_ids, grads in stream:
            rows.update(zip(batch_ids, grads))
        return GradientSet(ids, torch.from_numpy(np.stack([rows[s] for s in ids])) if ids else torch.zeros((0, 0)))
    batches = batches_for(examples, tokenizer, config.batch_size, ids=ids)
    got = collect_gradients(model, batches, config, preconditioner=preconditioner, progress=progress)
    wanted = list(examples["sample_id"]) if ids is None else list(ids)
    if got.sample_ids == wanted or not got.sample_ids:
        return got
    return GradientSet(wanted, in_order(wanted, got.sample_ids, got.grads))  # batches were length-bucketed


def compute_gradients_resumable(
    model,
    tokenizer,
    examples,
    ids: Sequence[str],
    config: GradientConfig,
    shard_dir: str | Path,
    preconditioner=None,
    chunk_size: int = 256,
    on_chunk: Callable[[int, int], None] | None = None,
    backend: BackendConfig | None = None,
    source: ModelSource | None = None,
) -> GradientSet:
    """:func:`compute_gradients` for ``ids``, committed chunk by chunk to safetensors shards in ``shard_dir``.

    ``shard_dir`` must be keyed by everything the gradients depend on (ids, model, gradient config,
    preconditioner); a shard whose ids differ from its chunk is recomputed. A killed or interrupted run keeps
    every committed shard, so a re-run computes only the missing chunks; a run that fails with an error removes
    the shards it wrote itself (keeping those of earlier runs), so a failure leaves the folder as it found it.
    Chunks are a multiple of ``config.batch_size`` so the batches (and so the float results) are the same whether
    or not a run was interrupted. Every missing chunk goes to ``backend`` as one stream (in parallel on Ray,
    whose results come back in any order); this process writes each chunk's shard as soon as all of its rows are
    back.

    Returns:
        ``GradientSet`` with ``grads: (len(ids), P) float32`` in the order of ``ids``.
    """
    from idistill_core.store import artifacts

    ids = list(ids)
    shard_dir = Path(shard_dir)
    step = max(config.batch_size, chunk_size - chunk_size % config.batch_size)
    chunks = [ids[start : start + step] for start in range(0, len(ids), step)]
    done: dict[int, np.ndarray] = {}
    for number, chunk_ids in enumerate(chunks):
        shard = shard_dir / f"chunk-{number:05d}.safetensors"
        if shard.exists():
            arrays, meta = artifacts.load_arrays(shard)
            if meta.get("ids") == chunk_ids:
                done[number] = arrays["grads"]
    todo = [number for number in range(len(chunks)) if number not in done]
    chunk_of = {sample_id: number for number in todo for sample_id in chunks[number]}
    rows: dict[str, np.ndarray] = {}
    missing = [sample_id for number in todo for sample_id in chunks[number]]
    written: list[Path] = []
    try:
        stream = backends.gradient_stream(backend, model, source, examples, missing, pad_id(tokenizer), config, preconditioner)
        for batch_ids, grads in stream:
            rows.update(zip(batch_ids, grads))
            for number in sorted({chunk_of[s] for s in batch_ids}):
                if number not in done and all(s in rows for s in chunks[number]):
                    done[number] = np.stack([rows.pop(s) for s in chunks[number]])
                    shard = shard_dir / f"chunk-{number:05d}.safetensors"
                    artifacts.save_arrays(shard, {"grads": done[number]}, {"ids": chunks[number]})
                    written.append(shard)
                    if on_chunk is not None:
                        on_chunk(number + 1, len(chunks))
    except Exception as error:  # an interrupt (BaseException) keeps the shards to resume from
        if not written:
            raise
        for shard in written:
            shard.unlink(missing_ok=True)
        if shard_dir.exists() and not any(shard_dir.iterdir()):
            shard_dir.rmdir()
        outcome = f"the {len(written)} gradient shards of this run were removed from {shard_dir}"
        if isinstance(error, IdistillError):
            raise type(error)(f"{error}; {outcome}") from None
        raise
    grads = torch.from_numpy(np.concatenate([done[n] for n in range(len(chunks))])) if chunks else torch.zeros((0, 0))
    return GradientSet(sample_ids=ids, grads=grads)


def warmup_preconditioner(
    model, tokenizer, examples, config: WarmupConfig, param_subset: str, progress: bool = False
):
    """Warm ``model`` up in place on a seeded random pool subset; return its Adam preconditioner (paper §1.6)."""
    from idistill_core.steps.warmup import adam_preconditioner, warmup

    cfg = config
    n = len(examples)
    size = min(n, cfg.steps * cfg.batch_size)
    rows = np.random.default_rng(cfg.seed).choice(n, size=size, replace=False)
    subset = examples.select(sorted(int(r) for r in rows))
    batches = list(iter_batches(subset, cfg.batch_size, pad_id(tokenizer)))
    optimizer = warmup(model, batches, cfg, progress=progress)
    names = select_parameters(model, param_subset)
    return adam_preconditioner(model, optimizer, names)

