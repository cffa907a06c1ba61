"""Per-target refinement landmarks: a few exact gradients where the target is, on top of the shared landmarks.

The shared landmarks (uniform random, one set for every target) put only ``L · share`` landmarks on a target's
own kind of data; the propagated ranking of those samples then hangs on a handful of landmarks and moves with the
draw (measured on the real benchmark, ``benchmarks/quality``). Each target therefore adds ``R`` landmarks of its
own: the pool samples nearest its dev samples in the JVP embedding space (round-robin over the dev samples, so
every target example gets its neighbours). Their exact values are kept, and the KRR is extended to ``L + R``
landmarks by block elimination (:class:`idistill_core.steps.propagate.LandmarkExtension`): the shared
coefficient table serves unchanged, and a new target costs its ``R`` gradients, ``R`` kernel columns over the
pool and one extra pass over ``C``, never a rebuild.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from idistill_core.errors import DataError
from idistill_core.pipeline.propagation import CoefficientTable
from idistill_core.steps.propagate import KernelRidge, PropagateConfig, squared_distances
from idistill_core.store.lance import EmbeddingStore

logger = logging.getLogger("idistill")


def nearest_to_targets(
    chunks: Iterable[tuple[list[str], np.ndarray]],
    target_emb: np.ndarray,
    count: int,
    exclude: Iterable[str] = (),
) -> list[str]:
    """The ``count`` pool samples nearest the target samples, round-robin: the first target sample's nearest,
    the second's, ..., then each one's second nearest, skipping repeats and ``exclude`` (ties by id).

    Streams ``(ids, (n, D))`` chunks once, keeping ``count + |exclude|`` candidates per target sample, so memory
    does not grow with the pool.

    Args:
        chunks: the pool's embeddings (``EmbeddingStore.iter_chunks(sample_ids=pool_ids)``).
        target_emb: ``(T, D)`` the target samples' embeddings, same embedder.
        count: how many to return (fewer when the pool runs out).
        exclude: ids never returned (the shared landmarks and held-out samples).
    """
    targets = torch.as_tensor(np.asarray(target_emb, dtype=np.float64))
    if targets.ndim != 2 or targets.shape[0] == 0:
        raise DataError(f"target_emb must be (T >= 1, D); got shape {tuple(targets.shape)}")
    excluded = set(exclude)
    keep = count + len(excluded)
    best_d = torch.full((targets.shape[0], 0), float("inf"), dtype=torch.float64)
    best_ids: list[list[str]] = [[] for _ in range(targets.shape[0])]
    for ids, emb in chunks:
        d = squared_distances(targets, torch.as_tensor(np.asarray(emb, dtype=np.float64)))  # (T, n)
        merged_d = torch.cat([best_d, d], dim=1)
        order = torch.argsort(merged_d, dim=1, stable=True)[:, :keep]
        best_d = torch.gather(merged_d, 1, order)
        best_ids = [[(best_ids[t] + list(ids))[j] for j in order[t].tolist()] for t in range(targets.shape[0])]
    picked: list[str] = []
    seen = set(excluded)
    for rank in range(keep):
        for t in range(targets.shape[0]):
            if rank < len(best_ids[t]) and best_ids[t][rank] not in seen and len(picked) < count:
                seen.add(best_ids[t][rank])
                picked.append(best_ids[t][rank])
    return picked


def refined_scores(
    store: EmbeddingStore,
    coefficients: CoefficientTable,
    pool_ids: Sequence[str] | None,
    values: np.ndarray,
    refine_ids: Sequence[str],
    refine_values: np.ndarray,
    config: PropagateConfig,
    chunk_size: int = 4096,
) -> tuple[list[str], np.ndarray]:
    """``(pool ids, (N, T))`` propagated scores with the shared landmarks (``coefficients``) and the target's own
    ``refine_ids``: exactly the KRR fit on all ``L + R`` landmarks, from one pass over ``C`` and one over the
    embeddings. ``pool_ids`` None: the coefficient table's rows, in its order.

    Args:
        values: ``(L, T)`` shared landmark values (rows in ``coefficients.landmark_ids`` order).
        refine_values: ``(R, T)`` the refinement landmarks' exact values.
        config: the propagate config ``coefficients`` were built with (its kernel and ridge; not ``auto``).
    """
    values = np.asarray(values, dtype=np.float64)
    if not len(refine_ids):
        ids, scores = coefficients.propagate(values)
        return ids, np.asarray(scores, dtype=np.float64)
    model = KernelRidge.fit(store.read(coefficients.landmark_ids), config)
    ext = model.extend(store.read(list(refine_ids)))
    num_t = values.shape[1]
    # one pass over C for both C·V and C·B (B = K_LR, the extra landmarks' kernel columns)
    ids, both = coefficients.propagate(np.hstack([values, ext.cross.numpy()]))
    both = np.asarray(both, dtype=np.float64)
    pool_ids = list(ids) if pool_ids is None else list(pool_ids)
    position = {s: i for i, s in enumerate(ids)}
    order = [position[s] for s in pool_ids]
    rows = []
    start = 0
    for chunk_ids, emb in store.iter_chunks(chunk_size, sample_ids=pool_ids):
        block = both[order[start : start + len(chunk_ids)]]
        kernel_rows = model.kernel_between(torch.as_tensor(np.asarray(emb, dtype=np.float64)), ext.emb)
        rows.append(ext.correction(block[:, :num_t], block[:, num_t:], kernel_rows, values, refine_values).numpy())
        start += len(chunk_ids)
    return pool_ids, np.concatenate(rows) if rows else np.zeros((0, num_t))


def coefficient_config(coefficients: CoefficientTable, config: PropagateConfig) -> PropagateConfig:
    """The concrete config a coefficient table was built with: ``config`` with its ``auto`` fields replaced by
    the kernel, ridge and bandwidth the table recorded (``build_coefficients`` writes them into its schema)."""
    if not config.needs_selection:
        return config
    import dataclasses
    import json

    recorded = json.loads(coefficients._dataset.schema.metadata[b"idistill"])
    return dataclasses.replace(
        config, kernel=recorded["kernel"], ridge=recorded["ridge"], bandwidth_scale=recorded["bandwidth_scale"]
    )
