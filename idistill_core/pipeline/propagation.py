"""Step 4 over the store: the pool's target-independent coefficient table ``C (N, L)``, propagation and fidelity.

``C = K(X, X_L)(K_LL + λI)⁻¹`` has one row per pool sample and serves every target (``C · V``); it is built
once per pool, landmark set and propagate config, resumably, as a Lance table next to the embeddings
(:func:`build_coefficients`). The KRR itself is :mod:`idistill_core.steps.propagate`.
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
    """Everything the coefficient rows depend on; its fingerprint names the Lance table.

    The coefficients do not depend on the target, so one table serves every target of a pool.
    """

    embeddings_table: str
    embeddings_version: int
    pool_hash: str
    landmark_ids: tuple[str, ...]
    propagate: str
    """``PropagateConfig.fingerprint()``."""
    dtype: str = "float32"
    chunk_rows: int = 16384

    def __post_init__(self) -> None:
        if self.dtype not in COEFFICIENT_DTYPES:
            raise ConfigError(f"coefficient dtype must be one of {COEFFICIENT_DTYPES}; got {self.dtype!r}")
        if self.chunk_rows < 1:
            raise ConfigError(f"coefficient chunk_rows must be >= 1; got {self.chunk_rows}")

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

    Built by :func:`build_coefficients` for exactly one pool, so streaming the whole table streams that pool.
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

        db = lancedb.connect(str(uri))
        if name not in db.list_tables().tables:
            raise StoreError(f"no propagation coefficients table '{name}' in {uri}; materialize the propagation.")
        dataset = db.open_table(name).to_lance()
        if version is not None:
            dataset = dataset.checkout_version(int(version))
        meta = json.loads(dataset.schema.metadata[b"idistill"])
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
    """Compute (or resume) the coefficient table of ``pool_ids`` in the store's LanceDB folder.

    The pool is split into fixed chunks of ``chunk_rows`` ids (pool order); each chunk is one commit, so a
    killed build keeps every committed chunk and a re-run computes only the chunks not in the table yet. The
    table's name is the fingerprint of everything the rows depend on (the store's table and Lance version, the
    pool, the landmarks, the propagate config, dtype, chunking): a changed input gets a new table.

    Args:
        store: an ``EmbeddingStore`` (ideally pinned at the version the pool was embedded at).
        pool_ids: the ``N`` pool samples (landmarks and held-out samples among them).
        landmark_ids: the ``L`` landmarks, in the order of the landmark values' rows.
        config: kernel, ridge and bandwidth; ``auto`` fields are chosen first by cross-validation over the
            landmarks (:func:`idistill_core.steps.kernel_select.select_kernel`), and the CHOSEN values enter the
            table's fingerprint (a different choice is a different table).
        landmark_grads: ``(L, P)`` the landmarks' gradients in ``landmark_ids`` order; needed only for ``auto``.
        dtype: ``float32`` or ``float16`` storage of the coefficients.
        on_chunk: called with ``(chunks done, chunks total)`` after each commit.
    """
    import json

    import lancedb
    import pyarrow as pa

    from idistill_core.store.hashing import ids_hash

    start = time.perf_counter()
    import pyarrow.compute as pc

    pool = pa.array(list(pool_ids), pa.string()) if not isinstance(pool_ids, pa.Array) else pool_ids
    if pc.count_distinct(pool).as_py() != len(pool):
        raise DataError("pool_ids has duplicate sample ids")
    landmark_ids = list(landmark_ids)
    selection = None
    if config.needs_selection:
        from idistill_core.steps.kernel_select import select_kernel

        if landmark_grads is None:
            raise ConfigError("PropagateConfig has 'auto' fields: build_coefficients needs the landmark gradients")
        selection = select_kernel(store.read(landmark_ids), landmark_grads, config)
        config = selection.config
    spec = CoefficientSpec(
        embeddings_table=store.name,
        embeddings_version=store.version,
        pool_hash=ids_hash(pool.to_pylist()),
        landmark_ids=tuple(landmark_ids),
        propagate=config.fingerprint(),
        dtype=dtype,
        chunk_rows=chunk_rows,
    )
    num_l = len(landmark_ids)
    value_type = pa.float32() if dtype == "float32" else pa.float16()
    schema = pa.schema(
        [
            pa.field(
                "sample_id", pa.string(), nullable=False,
                metadata={b"lance-schema:unenforced-primary-key:position": b"1"},
            ),
            pa.field("chunk", pa.int32()),
            pa.field("c", pa.list_(value_type, num_l)),
        ],
        metadata={
            b"idistill": json.dumps(
                {
                    "landmark_ids": landmark_ids,
                    "spec": spec.fingerprint(),
                    "kernel": config.kernel,
                    "ridge": config.ridge,
                    "bandwidth_scale": config.bandwidth_scale,
                }
            ).encode()
        },
    )
    db = lancedb.connect(store.uri)
    name = spec.table_name()
    table = db.create_table(name, schema=schema, exist_ok=True)
    done = set()
    if table.count_rows():
        done = set(np.unique(table.to_lance().to_table(columns=["chunk"]).column("chunk").to_numpy()).tolist())
    chunks = range(0, len(pool), chunk_rows)
    ridge = KernelRidge.fit(store.read(landmark_ids), config)
    computed = 0
    for number, first in enumerate(chunks):
        if number in done:
            continue
        chunk_ids = pool.slice(first, chunk_rows)
        coeffs = ridge.coefficients(store.read(chunk_ids)).numpy()
        if not np.isfinite(coeffs).all():
            raise NumericalError(f"propagation coefficients of chunk {number} are not finite; raise the ridge")
        with np.errstate(over="ignore"):
            stored = coeffs.astype(np.float32 if dtype == "float32" else np.float16)
        if not np.isfinite(stored).all():
            raise NumericalError(f"propagation coefficients of chunk {number} overflow {dtype}; use float32")
        batch = pa.table(
            {
                "sample_id": chunk_ids,
                "chunk": pa.array(np.full(len(chunk_ids), number, np.int32)),
                "c": pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1), value_type), num_l),
            },
            schema=schema,
        )
        # insert-if-missing: a second builder racing on the same chunk never duplicates its rows
        table.merge_insert("sample_id").when_not_matched_insert_all().use_index(False).execute(batch)
        computed += 1
        if on_chunk is not None:
            on_chunk(number + 1, len(chunks))
    if not any(index.columns == ["sample_id"] for index in table.list_indices()):
        from lancedb.index import BTree

        table.create_index("sample_id", config=BTree(), replace=False)
    if computed > 1:
        table.optimize()
    report = CoefficientReport(
        table=name,
        version=int(table.version),
        rows=int(table.count_rows()),
        chunks_computed=computed,
        chunks_reused=len(chunks) - computed,
        seconds=time.perf_counter() - start,
        sigma=ridge.sigma,
        ridge_abs=ridge.ridge_abs,
        config=config,
        selection=selection,
    )
    logger.info(
        "propagate: coefficients %s: %d rows, %d chunks computed, %d reused (%.1fs)",
        name, report.rows, computed, report.chunks_reused, report.seconds,
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
