"""Step 1 over the store: JVP embeddings (and RDS+ features) of every pool sample into LanceDB, resumably.

Only missing ids are computed; commits every ``commit_every`` rows keep a killed run's work, and a failed run
rolls its rows back (:func:`_fill_store`). The backend (local or Ray) computes, this process writes, and a pass
that inserted rows ends with ``EmbeddingStore.optimize`` (compaction + key index), so the table a pass leaves is
the one reads are fast on: 100 commits of 256 rows otherwise stay 100 fragments with an index over 256 rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idistill_core import backends
from idistill_core.backends import BackendConfig, ModelSource
from idistill_core.data.batch import (
    batch_padding,
    batches_for,
    length_order,
    pad_id,
    padding_fraction,
    rows_for,
)
from idistill_core.errors import IdistillError
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.steps.embed import EmbedConfig
from idistill_core.store.lance import EmbeddingStore, StoreIdentity

logger = logging.getLogger("idistill")


@dataclass
class EmbedReport:
    inserted: int
    already_present: int
    seconds: float
    table_version: int
    row_count: int
    computed: int = 0
    """Samples embedded by this call (on whichever backend); a re-run after a kill computes only the missing."""
    padding_fraction: float = 0.0
    """Share of padded positions in the batches this call computed (length-bucketed)."""
    optimize: dict | None = None
    """What the closing ``EmbeddingStore.optimize`` did (fragments and unindexed rows before and after, seconds);
    None when the call inserted nothing."""


def open_store(
    uri: str | Path, table: str, model_fingerprint: str, recipe: SelectionRecipe, hidden_size: int
) -> EmbeddingStore:
    """Open (or create) the embedding table for this model and embedding recipe; refuses any other."""
    dim = recipe.embed.output_dim(hidden_size)
    identity = StoreIdentity(model_fingerprint=model_fingerprint, recipe=recipe.embed_fingerprint(model_fingerprint), dim=dim)
    return EmbeddingStore.open(uri, table, identity)


def embed_pool(
    model,
    tokenizer,
    examples,
    store: EmbeddingStore,
    config: EmbedConfig,
    commit_every: int = 256,
    progress: bool = False,
    on_commit: Callable[[int, int], None] | None = None,
    backend: BackendConfig | None = None,
    source: ModelSource | None = None,
) -> EmbedReport:
    """Embed the pool samples that the store does not hold yet, committing every ``commit_every`` rows.

    A killed or interrupted run keeps the committed chunks (valid rows: a re-run computes only the ids still
    missing). A run that fails with an error (a NaN in a later sample, say) rolls the table back to its version
    at the start, so no row of a failed run stays; when another writer committed in between, the rows are kept
    instead. Either way the error message says which. ``backend`` says where the vectors are computed (default:
    here, on ``model``; ``ray`` workers load ``source``); this process stays the one writer.
    """
    start = time.perf_counter()
    all_ids = list(examples["sample_id"])
    missing = store.missing_ids(all_ids)
    logger.info("embeddings: %d of %d pool samples missing from '%s'", len(missing), len(all_ids), store.name)
    padding, stream = 0.0, iter(())
    if missing:
        # length-bucketed: every backend batches ids in the order given (batch.py: why one global stable sort)
        lengths = [len(x) for x in examples.select(rows_for(examples, missing))["input_ids"]]
        missing = [missing[i] for i in length_order(lengths)]
        padding = padding_fraction(sorted(lengths), config.batch_size)
        logger.info("embeddings: length-bucketed batches, padding fraction %.3f", padding)
        stream = backends.embed_stream(backend, model, source, examples, missing, pad_id(tokenizer), config, progress)
    return _fill_store(store, stream, len(all_ids), len(missing), padding, start, commit_every, on_commit, "embeddings")


def _fill_store(
    store: EmbeddingStore,
    stream: Iterable[tuple[list[str], np.ndarray]],
    pool_size: int,
    total: int,
    padding: float,
    start: float,
    commit_every: int,
    on_commit: Callable[[int, int], None] | None,
    what: str,
) -> EmbedReport:
    """Insert the ``(ids, vectors)`` of ``stream`` (the ``total`` missing ids) into ``store``, a commit per
    ``commit_every`` rows, and report on the whole call (``start``: its ``perf_counter``).

    An interrupt (BaseException) keeps the committed rows to resume from; an error rolls the table back to its
    version at the start, unless another writer committed in between (then this run's rows are kept); the
    re-raised error says which. A pass that inserted rows is closed by one ``store.optimize()`` (its report in
    ``EmbedReport.optimize``), whichever backend computed them: Ray's results come back through this loop too.
    """
    inserted = computed = 0
    pending_ids: list[str] = []
    pending_vectors: list[np.ndarray] = []
    start_version = latest = store.version
    ours = True  # every commit since start_version is this run's

    def commit() -> None:
        nonlocal inserted, pending_ids, pending_vectors, latest, ours
        if pending_ids:
            before = store.version
            inserted += store.insert_missing(pending_ids, np.concatenate(pending_vectors))
            ours = ours and before == latest  # (one insert may be several commits of its own)
            latest = store.version
            if on_commit is not None:
                on_commit(inserted, total)
            pending_ids, pending_vectors = [], []

    try:
        for ids, vectors in stream:
            computed += len(ids)
            pending_ids += ids
            pending_vectors.append(vectors)
            if len(pending_ids) >= commit_every:
                commit()
        commit()
    except Exception as error:
        if inserted == 0:
            raise
        restored = store.restore(start_version, expected_latest=latest) if ours else None
        if restored is not None:
            outcome = (
                f"the table '{store.name}' was rolled back to version {start_version} "
                f"({inserted} rows of this run removed)"
            )
        else:
            outcome = (
                f"this run's {inserted} rows in '{store.name}' are kept (another writer committed since); "
                "a re-run resumes from them"
            )
        logger.error("%s failed: %s", what, outcome)
        if isinstance(error, IdistillError):
            raise type(error)(f"{error}; {outcome}") from None
        raise
    optimized = None
    if inserted:
        optimized = store.optimize()
        logger.info(
            "%s: optimized '%s' in %.1f s: %d -> %d fragments, %d -> %d unindexed rows", what, store.name,
            optimized["seconds"], optimized["before"]["fragments"], optimized["after"]["fragments"],
            optimized["before"]["unindexed_rows"], optimized["after"]["unindexed_rows"],
        )
    return EmbedReport(
        inserted=inserted,
        already_present=pool_size - total,
        seconds=time.perf_counter() - start,
        table_version=store.version,
        row_count=store.count(),
        computed=computed,
        padding_fraction=padding,
        optimize=optimized,
    )


RDS_FEATURES_RECIPE = "rds-plus-v1"
"""Revision of the RDS+ pooling (``methods.rds.rds_embeddings``); part of the feature table's identity."""


def rds_table_name(model_fingerprint: str, max_length: int) -> str:
    """One RDS+ feature table per model and max length (a profile change opens a new table, never a refusal)."""
    return f"rds_features_{model_fingerprint[:12]}_len{max_length}"


def open_rds_store(uri: str | Path, model_fingerprint: str, max_length: int, hidden_size: int) -> EmbeddingStore:
    """The RDS+ pool-feature table of this model and max length: unit-norm final hidden states, float32
    (cosines are ranked directly; float16 would move them by ~5e-4 and flip near-ties)."""
    identity = StoreIdentity(
        model_fingerprint=model_fingerprint, recipe=f"{RDS_FEATURES_RECIPE}-len{max_length}", dim=hidden_size,
        dtype="float32",
    )
    return EmbeddingStore.open(uri, rds_table_name(model_fingerprint, max_length), identity)


def embed_rds_pool(
    model,
    tokenizer,
    examples,
    store: EmbeddingStore,
    batch_size: int,
    commit_every: int = 256,
    on_commit: Callable[[int, int], None] | None = None,
) -> EmbedReport:
    """RDS+ features (``methods.rds.rds_embeddings``) of the pool samples ``store`` does not hold yet.

    Target-independent, so computed once per pool and model and read by every target with method ``rds``.
    Length-bucketed batches of ``batch_size`` (one decoder forward each, torch's own threads), committed every
    ``commit_every`` rows (insert-if-missing keyed by ``sample_id``): a killed run keeps its committed
    rows, each a finished feature of one sample, and a re-run computes only the ids still missing; a failed one
    rolls the table back as ``embed_pool`` does.
    """
    from idistill_core.methods.rds import rds_embeddings

    start = time.perf_counter()
    all_ids = list(examples["sample_id"])
    missing = store.missing_ids(all_ids)
    logger.info("RDS+ features: %d of %d pool samples missing from '%s'", len(missing), len(all_ids), store.name)
    padding = batch_padding(examples, batch_size, missing) if missing else 0.0

    def stream():
        for batch in batches_for(examples, tokenizer, batch_size, ids=missing):
            ids, features = rds_embeddings(model, [batch])
            yield ids, features.numpy()

    return _fill_store(
        store, stream(), len(all_ids), len(missing), padding, start, commit_every, on_commit, "RDS+ features"
    )
