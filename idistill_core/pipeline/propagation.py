"""Step 4 over the store: the pool's target-independent coefficient table ``C (N, L)``, propagation and fidelity.

``C = K(X, X_L)(K_LL + λI)⁻¹`` has one row per pool sample and serves every target (``C · V``); it is built
once per pool, landmark set and propagate config, resumably, as a Lance table next to the embeddings
(:func:`build_coefficients`). The KRR itself is :mod:`idistill_core.steps.propagate`.

Just over 500 lines because the table's keying by content, its incremental extension for new pool rows and its
damaged-table handling are one contract with the readers here (:class:`CoefficientTable`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from idistill_core.errors import ConfigError, DataError, NumericalError
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.steps.propagate import KernelRidge, PropagateConfig
from idistill_core.store.hashing import config_fingerprint
from idistill_core.store.lance import EmbeddingStore

logger = logging.getLogger("idistill")


COEFFICIENT_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class CoefficientSpec:
    """Everything a coefficient row depends on besides its own sample's vector; its fingerprint names the Lance
    table, whose rows are keyed by ``sample_id``.

    A row ``C_i = k(x_i, X_L)(K_LL + λI)⁻¹`` depends on the sample's vector (fixed by its id within the embeddings
    table and its identity: model fingerprint, embed recipe, dim, dtype), on the landmarks' vectors and on the
    propagate config; not on the embeddings table's Lance version (another pool's append, a compaction) nor on
    the rest of the pool (issue 24). So a table is reused across those, and a grown pool adds only its new rows.
    The coefficients do not depend on the target either: one table serves every target.
    """

    embeddings_table: str
    embeddings_identity: str
    """``StoreIdentity.to_json()`` of the embeddings: model fingerprint, embed recipe, dim, dtype."""
    landmark_ids: tuple[str, ...]
    landmark_vectors: str
    """Hash of the landmarks' stored vectors (what the ridge is fitted on)."""
    propagate: str
    """``PropagateConfig.fingerprint()``."""
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in COEFFICIENT_DTYPES:
            raise ConfigError(f"coefficient dtype must be one of {COEFFICIENT_DTYPES}; got {self.dtype!r}")

    def fingerprint(self) -> str:
        return config_fingerprint(self, 16)

    def table_name(self) -> str:
        return f"coefficients_{self.fingerprint()}"


@dataclass
class CoefficientReport:
    table: str
    version: int
    rows: int
    chunks_computed: int
    chunks_reused: int
    seconds: float
    sigma: float | None
    ridge_abs: float
    config: PropagateConfig | None = None
    """The config the rows were computed with (``auto`` fields replaced by the chosen values)."""
    selection: object | None = None
    """The ``kernel_select.KernelSelection`` when the config had ``auto`` fields, else None."""
    rows_computed: int = 0
    """Kernel rows this build computed (the pool's ids the table had no row for)."""
    rows_reused: int = 0
    """Pool rows already in the table."""
    rows_removed: int = 0
    """Rows deleted because their id left the pool."""

    def summary(self) -> str:
        """One line: the kernel, bandwidth and ridge used (with the CV result when they were chosen)."""
        if self.selection is not None:
            return self.selection.summary()
        c = self.config
        if c is None:
            return f"sigma={self.sigma} ridge_abs={self.ridge_abs:g}"
        band = f" bandwidth={c.bandwidth_scale:g}×median (σ={self.sigma:.4g})" if c.kernel == "rbf" else ""
        return f"kernel={c.kernel}{band} ridge={c.ridge:g} (fixed)"


class CoefficientTable:
    """An ``N × L`` Lance table ``(sample_id, chunk, c)`` of KRR coefficients, keyed by ``sample_id``.

    :func:`build_coefficients` leaves it holding exactly one pool (at the version it returns), so streaming the
    whole table streams that pool; rows are added for new ids and deleted for ids that left (issue 24).
    :meth:`propagate` is a new target's whole propagation: ``C · V`` for landmark values ``V (L, T)``, streamed
    in batches (memory ``O(batch · L + N · T)``), no kernel and no refit.
    """

    def __init__(self, dataset, name: str, landmark_ids: list[str]):
        self._dataset = dataset
        self.name = name
        self.landmark_ids = landmark_ids

    @classmethod
    def open(cls, uri: str, name: str, version: int | None = None) -> CoefficientTable:
        """Open the table (at ``version`` when given: later writes stay invisible)."""
        import json

        import lancedb

        from idistill_core.errors import StoreError
        from idistill_core.store.lance import damaged_table

        db = lancedb.connect(str(uri))
        if name not in db.list_tables().tables:
            raise StoreError(f"no propagation coefficients table '{name}' in {uri}; materialize the propagation.")
        with damaged_table(name, uri):
            dataset = db.open_table(name).to_lance()
            if version is not None:
                dataset = dataset.checkout_version(int(version))
            meta = json.loads(dataset.schema.metadata[b"idistill"])
            # a scan of the key column: a truncated data file fails here, not in the middle of a target's run
            dataset.to_table(columns=["chunk"])
        return cls(dataset, name, list(meta["landmark_ids"]))

    @property
    def version(self) -> int:
        return int(self._dataset.version)

    @property
    def num_landmarks(self) -> int:
        return len(self.landmark_ids)

    def count(self) -> int:
        return int(self._dataset.count_rows())

    def iter_chunks(self, batch_rows: int = 16384) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(ids, (n, L) float32)`` batches of the whole table (its pool), in table order."""
        for batch in self._dataset.to_batches(columns=["sample_id", "c"], batch_size=batch_rows):
            if batch.num_rows:
                yield batch.column("sample_id").to_pylist(), _matrix(batch.column("c"), self.num_landmarks)

    def read(self, sample_ids: Sequence[str]) -> np.ndarray:
        """``(len(sample_ids), L) float32`` coefficient rows in the order given."""
        from idistill_core.store.lance import read_by_id

        rows = read_by_id(self._dataset, sample_ids, ["sample_id", "c"], self.name, "they are not in its pool")
        return _matrix(rows.column("c"), self.num_landmarks)

    def matrix(self) -> tuple[list[str], np.ndarray]:
        """The whole ``(N, L) float32`` matrix with its ids (second order needs ``C`` at once)."""
        ids: list[str] = []
        parts = []
        for chunk_ids, chunk in self.iter_chunks():
            ids += chunk_ids
            parts.append(chunk)
        return ids, np.concatenate(parts) if parts else np.zeros((0, self.num_landmarks), np.float32)

    def propagate(self, values: np.ndarray, batch_rows: int = 16384) -> tuple[list[str], np.ndarray]:
        """``(pool ids, (N, T) float32)`` scores ``C · V`` for landmark values ``V (L, T)``, streamed."""
        from idistill_core.errors import DataError

        vals = np.asarray(values, dtype=np.float64)
        if vals.ndim != 2 or vals.shape[0] != self.num_landmarks:
            raise DataError(f"values must be (L={self.num_landmarks}, T); got shape {vals.shape}")
        if not np.isfinite(vals).all():
            raise NumericalError("landmark values have non-finite entries")
        ids: list[str] = []
        parts = []
        for chunk_ids, chunk in self.iter_chunks(batch_rows):
            ids += chunk_ids
            parts.append((chunk.astype(np.float64) @ vals).astype(np.float32))
        return ids, np.concatenate(parts) if parts else np.zeros((0, vals.shape[1]), np.float32)

    # -- writing and retention (build_coefficients, the maintenance job) ----------------------------------------
    @staticmethod
    def arrow_schema(landmark_ids: Sequence[str], dtype: str, meta: dict):
        """The table's schema: ``sample_id`` (declared key), ``chunk`` (commit number), ``c`` (L values)."""
        import json

        import pyarrow as pa

        value_type = pa.float32() if dtype == "float32" else pa.float16()
        return pa.schema(
            [
                pa.field(
                    "sample_id", pa.string(), nullable=False,
                    metadata={b"lance-schema:unenforced-primary-key:position": b"1"},
                ),
                pa.field("chunk", pa.int32()),
                pa.field("c", pa.list_(value_type, len(landmark_ids))),
            ],
            metadata={b"idistill": json.dumps({"landmark_ids": list(landmark_ids), **meta}).encode()},
        )

    @staticmethod
    def append_rows(table, schema, sample_ids, coefficients: np.ndarray, chunk: int) -> int:
        """One commit of rows ``(sample_ids, (n, L) coefficients)``, insert-if-missing on ``sample_id`` (a second
        builder racing on the same ids never duplicates them); returns the rows inserted."""
        import pyarrow as pa

        value_type = schema.field("c").type.value_type
        dtype = np.float32 if value_type == pa.float32() else np.float16
        with np.errstate(over="ignore"):
            stored = np.asarray(coefficients).astype(dtype, copy=False)
        if not np.isfinite(stored).all():
            raise NumericalError(f"propagation coefficients of chunk {chunk} overflow {np.dtype(dtype).name}; use float32")
        ids = sample_ids if isinstance(sample_ids, pa.Array) else pa.array(list(sample_ids), pa.string())
        width = schema.field("c").type.list_size
        batch = pa.table(
            {
                "sample_id": ids,
                "chunk": pa.array(np.full(len(ids), chunk, np.int32)),
                "c": pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1), value_type), width),
            },
            schema=schema,
        )
        result = table.merge_insert("sample_id").when_not_matched_insert_all().use_index(False).execute(batch)
        return int(result.num_inserted_rows)

    @staticmethod
    def collect_garbage(uri, keep: Sequence[str], older_than=None) -> dict:
        """Drop the coefficient tables in ``uri`` not in ``keep`` and not written for ``older_than`` (default 7
        days: a run that opened one recently may still read it), and prune the kept tables' versions older than
        that. Returns ``{"dropped": [...], "kept": [...], "versions_pruned": n, "bytes_freed": n}``."""
        from datetime import datetime, timedelta

        import lancedb

        older_than = timedelta(days=7) if older_than is None else older_than
        db = lancedb.connect(str(uri))
        names: list[str] = []
        token = None
        while True:
            page = db.list_tables(page_token=token)
            names += page.tables
            token = page.page_token
            if not token:
                break
        dropped, kept, pruned, freed = [], [], 0, 0
        for name in sorted(n for n in names if n.startswith("coefficients_")):
            dataset = db.open_table(name).to_lance()
            if name in set(keep):
                stats = dataset.cleanup_old_versions(older_than=older_than)
                pruned += int(stats.old_versions)
                freed += int(stats.bytes_removed)
                kept.append(name)
                continue
            last = max(v["timestamp"] for v in dataset.versions())
            now = datetime.now(last.tzinfo) if last.tzinfo else datetime.now()
            if now - last < older_than:
                kept.append(name)
                continue
            freed += sum(int(v["metadata"].get("total_files_size", 0)) for v in dataset.versions()[-1:])
            db.drop_table(name)
            dropped.append(name)
        logger.info("propagate: coefficient tables dropped %s, kept %s, %d old versions pruned", dropped, kept, pruned)
        return {"dropped": dropped, "kept": kept, "versions_pruned": pruned, "bytes_freed": freed}


def _matrix(column, width: int) -> np.ndarray:
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32, copy=False)


def build_coefficients(
    store,
    pool_ids: Sequence[str],
    landmark_ids: Sequence[str],
    config: PropagateConfig,
    dtype: str = "float32",
    chunk_rows: int = 16384,
    on_chunk=None,
    landmark_grads: torch.Tensor | np.ndarray | None = None,
) -> tuple[CoefficientTable, CoefficientReport]:
    """Compute, extend or reuse the coefficient table of ``pool_ids`` in the store's LanceDB folder.

    The table is named by what a row depends on besides its own sample's vector (:class:`CoefficientSpec`: the
    embeddings table and identity, the landmarks and their vectors, the propagate config, dtype), and its rows are
    keyed by ``sample_id``. A build computes only the pool's ids that have no row yet, in commits of
    ``chunk_rows`` rows (pool order), and deletes rows of ids no longer in the pool, so the table at the returned
    version holds exactly the pool. Hence: a re-run after a kill computes only what its last commit missed; an
    append to (or a compaction of) the embeddings table changes nothing here; a pool grown by ``m`` rows, with the
    same landmarks, costs ``m`` kernel rows, not a rebuild (issue 24). Old tables are dropped by
    :meth:`CoefficientTable.collect_garbage` (the maintenance job).

    Args:
        store: an ``EmbeddingStore`` (ideally pinned at the version the pool was embedded at).
        pool_ids: the ``N`` pool samples (landmarks and held-out samples among them).
        landmark_ids: the ``L`` landmarks, in the order of the landmark values' rows.
        config: kernel, ridge and bandwidth; ``auto`` fields are chosen first by cross-validation over the
            landmarks (:func:`idistill_core.steps.kernel_select.select_kernel`), and the CHOSEN values enter the
            table's fingerprint (a different choice is a different table).
        landmark_grads: ``(L, P)`` the landmarks' gradients in ``landmark_ids`` order; needed only for ``auto``.
        dtype: ``float32`` or ``float16`` storage of the coefficients.
        chunk_rows: rows per commit (what a kill can lose).
        on_chunk: called with ``(commits done, commits this build makes)`` after each commit.
    """
    import hashlib
    from datetime import timedelta

    import lancedb
    import pyarrow as pa
    import pyarrow.compute as pc

    from idistill_core.store.lance import damaged_table

    start = time.perf_counter()
    if chunk_rows < 1:
        raise ConfigError(f"coefficient chunk_rows must be >= 1; got {chunk_rows}")
    pool = pa.array(list(pool_ids), pa.string()) if not isinstance(pool_ids, pa.Array) else pool_ids.cast(pa.string())
    if pc.count_distinct(pool).as_py() != len(pool):
        raise DataError("pool_ids has duplicate sample ids")
    landmark_ids = list(landmark_ids)
    selection = None
    landmark_emb = store.read(landmark_ids)
    if config.needs_selection:
        from idistill_core.steps.kernel_select import select_kernel

        if landmark_grads is None:
            raise ConfigError("PropagateConfig has 'auto' fields: build_coefficients needs the landmark gradients")
        selection = select_kernel(landmark_emb, landmark_grads, config)
        config = selection.config
    spec = CoefficientSpec(
        embeddings_table=store.name,
        embeddings_identity=store.identity.to_json().decode(),
        landmark_ids=tuple(landmark_ids),
        landmark_vectors=hashlib.sha256(np.ascontiguousarray(landmark_emb, dtype=np.float32).tobytes()).hexdigest()[:16],
        propagate=config.fingerprint(),
        dtype=dtype,
    )
    schema = CoefficientTable.arrow_schema(
        landmark_ids, dtype,
        {"spec": spec.fingerprint(), "kernel": config.kernel, "ridge": config.ridge, "bandwidth_scale": config.bandwidth_scale},
    )
    # interval 0: the table handle sees its own compaction's commit (else the index update conflicts with it)
    db = lancedb.connect(store.uri, read_consistency_interval=timedelta(0))
    name = spec.table_name()
    with damaged_table(name, store.uri):
        table = db.create_table(name, schema=schema, exist_ok=True)
        present = table.to_lance().to_table(columns=["sample_id", "chunk"])
    stored_ids = present.column("sample_id").combine_chunks()
    missing = pool.filter(pc.invert(pc.is_in(pool, value_set=stored_ids)))
    extra = stored_ids.filter(pc.invert(pc.is_in(stored_ids, value_set=pool)))
    next_chunk = int(pc.max(present.column("chunk")).as_py() or 0) + 1 if present.num_rows else 0
    commits = -(-len(missing) // chunk_rows)
    ridge = KernelRidge.fit(landmark_emb, config)
    for number in range(commits):
        chunk_ids = missing.slice(number * chunk_rows, chunk_rows)
        coeffs = ridge.coefficients(store.read(chunk_ids)).numpy()
        if not np.isfinite(coeffs).all():
            raise NumericalError(f"propagation coefficients of chunk {number} are not finite; raise the ridge")
        CoefficientTable.append_rows(table, schema, chunk_ids, coeffs, next_chunk + number)
        if on_chunk is not None:
            on_chunk(number + 1, commits)
    for first in range(0, len(extra), 4096):  # ids that left the pool: the table stays exactly the pool
        quoted = ", ".join("'" + s.replace("'", "''") + "'" for s in extra.slice(first, 4096).to_pylist())
        table.delete(f"sample_id IN ({quoted})")
    if len(missing) or len(extra):
        if not any(index.columns == ["sample_id"] for index in table.list_indices()):
            from lancedb.index import BTree

            table.create_index("sample_id", config=BTree(), replace=False)
        dataset = table.to_lance()
        # only fragments below a commit's size (a short last chunk, a few appended rows) are rewritten: appending
        # one row to a 1M-row table must not rewrite the table (LanceDB's own optimize targets 1M-row fragments)
        dataset.optimize.compact_files(target_rows_per_fragment=chunk_rows)
        table.to_lance().optimize.optimize_indices()
    total_chunks = -(-len(pool) // chunk_rows)
    report = CoefficientReport(
        table=name,
        version=int(table.version),
        rows=int(table.count_rows()),
        chunks_computed=commits,
        chunks_reused=max(0, total_chunks - commits),
        seconds=time.perf_counter() - start,
        sigma=ridge.sigma,
        ridge_abs=ridge.ridge_abs,
        config=config,
        selection=selection,
        rows_computed=len(missing),
        rows_reused=len(pool) - len(missing),
        rows_removed=len(extra),
    )
    logger.info(
        "propagate: coefficients %s: %d rows, %d computed, %d reused, %d removed (%.1fs)",
        name, report.rows, report.rows_computed, report.rows_reused, report.rows_removed, report.seconds,
    )
    return CoefficientTable.open(store.uri, name, report.version), report


def landmark_gradients_for_propagation(landmark_grads, recipe: SelectionRecipe):
    """The landmark gradients kernel selection should predict: the ones the landmark values are computed from
    (centred when ``recipe.center``); None when the propagate config has no ``auto`` field (nothing to choose)."""
    if not recipe.propagate.needs_selection:
        return None
    g = torch.as_tensor(np.asarray(landmark_grads))
    if recipe.center:
        from idistill_core.steps.influence import center_gradients

        g = center_gradients(g, g.mean(dim=0))
    return g


def propagate_scores(
    store: EmbeddingStore,
    pool_ids: Sequence[str],
    landmark_ids: Sequence[str],
    values: np.ndarray,
    config: PropagateConfig,
    chunk_size: int = 4096,
    landmark_grads: torch.Tensor | np.ndarray | None = None,
) -> tuple[list[str], np.ndarray, KernelRidge]:
    """KRR from landmark embeddings to every sample of the pool: ``(pool ids, (N, T) float32, fitted model)``.

    Only ``pool_ids`` are read from the store (by id, in that order): a store shared with other pools never
    leaks their rows into the scores. ``auto`` fields of ``config`` are chosen from ``landmark_grads`` first
    (``kernel_select``), never from ``values``.
    """
    landmark_emb = store.read(list(landmark_ids))
    if config.needs_selection:
        from idistill_core.steps.kernel_select import select_kernel

        if landmark_grads is None:
            raise ConfigError("PropagateConfig has 'auto' fields: propagate_scores needs the landmark gradients")
        config = select_kernel(landmark_emb, landmark_grads, config).config
    ridge = KernelRidge.fit(landmark_emb, config)
    ids: list[str] = []

    def chunks():
        for chunk_ids, chunk in store.iter_chunks(chunk_size, sample_ids=pool_ids):
            ids.extend(chunk_ids)
            yield chunk

    scores = np.asarray(ridge.predict(values, chunks()), dtype=np.float32)
    return ids, scores, ridge


def shared_coefficients(
    store: EmbeddingStore,
    pool_ids: Sequence[str],
    landmark_ids: Sequence[str],
    config: PropagateConfig,
    dtype: str = "float32",
    on_chunk: Callable[[int, int], None] | None = None,
    landmark_grads: torch.Tensor | np.ndarray | None = None,
):
    """The target-independent KRR coefficients ``C (N, L)`` of the pool, built once and resumably in the store's
    LanceDB folder (``(CoefficientTable, CoefficientReport)``); every target then needs only ``C · V``.

    ``landmark_grads`` ``(L, P)`` (rows in ``landmark_ids`` order) are needed when ``config`` has ``auto`` fields:
    the kernel, bandwidth and ridge are then chosen by cross-validation on the landmarks' own gradients, which
    keeps the coefficients target-independent (``CoefficientReport.selection`` has the choice and its CV grid).
    """
    return build_coefficients(
        store, pool_ids, landmark_ids, config, dtype=dtype, on_chunk=on_chunk, landmark_grads=landmark_grads
    )


def keep_exact(ids: Sequence[str], scores: np.ndarray, exact_ids: Sequence[str], exact_values: Sequence[np.ndarray]) -> np.ndarray:
    """``scores`` with the rows of samples whose exact gradient was computed (landmarks, held-out samples)
    replaced by their exact values: only the others need the propagated estimate."""
    values = [np.asarray(v, dtype=np.float64).reshape(-1, scores.shape[1]) for v in exact_values if len(v)]
    if not values:
        return scores
    exact = np.concatenate(values)
    position = {s: i for i, s in enumerate(ids)}
    rows = [(position[s], j) for j, s in enumerate(exact_ids) if s in position]
    out = np.array(scores, copy=True)
    if rows:
        at, src = zip(*rows, strict=True)
        out[list(at)] = exact[list(src)].astype(out.dtype)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def fidelity(
    ridge: KernelRidge, landmark_vals: np.ndarray, holdout_emb: np.ndarray, holdout_vals: np.ndarray
) -> float:
    """Spearman ρ between propagated and exact influence (mean over targets) on held-out pool samples.

    ``landmark_vals``: (L, T) exact landmark influence the ridge was fitted for; ``holdout_emb``: (H, D);
    ``holdout_vals``: (H, T) exact influence of the held-out samples.
    """
    if len(holdout_emb) < 3:
        return float("nan")
    predicted = np.asarray(ridge.predict(landmark_vals, [holdout_emb]))
    return spearman(predicted.mean(axis=1), np.asarray(holdout_vals).mean(axis=1))


def coefficient_fidelity(
    coefficients: CoefficientTable, landmark_vals: np.ndarray, holdout_ids: Sequence[str], holdout_vals: np.ndarray
) -> float:
    """:func:`fidelity` from the shared coefficients: Spearman ρ of ``C_holdout · V`` against the exact values."""
    if len(holdout_ids) < 3:
        return float("nan")
    predicted = coefficients.read(list(holdout_ids)).astype(np.float64) @ np.asarray(landmark_vals, dtype=np.float64)
    return spearman(predicted.mean(axis=1), np.asarray(holdout_vals).mean(axis=1))
