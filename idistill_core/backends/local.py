"""The in-process backend: today's path, the caller's model, batches in the order of the ids."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from idistill_core.backends import BackendConfig, ModelSource, select_rows
from idistill_core.data.batch import iter_batches


def embed_stream(
    backend: BackendConfig,
    model,
    source: ModelSource | None,
    examples,
    ids: Sequence[str],
    pad_id: int,
    config,
    progress: bool = False,
) -> Iterator[tuple[list[str], np.ndarray]]:
    from idistill_core.steps.embed import embed_samples

    batches = iter_batches(select_rows(examples, ids), config.batch_size, pad_id)
    yield from embed_samples(model, batches, config, progress=progress)


def gradient_stream(
    backend: BackendConfig,
    model,
    source: ModelSource | None,
    examples,
    ids: Sequence[str],
    pad_id: int,
    config,
    preconditioner=None,
) -> Iterator[tuple[list[str], np.ndarray]]:
    from idistill_core.steps.gradients import iter_gradients

    batches = iter_batches(select_rows(examples, ids), config.batch_size, pad_id)
    for sample_ids, grads in iter_gradients(model, batches, config, preconditioner):
        yield sample_ids, grads.detach().float().numpy()
