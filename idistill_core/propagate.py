"""Step 4: propagate landmark influences to the whole pool by kernel ridge regression (paper §4.4).

``p̂ = K(E, L) (K(L, L) + λI)⁻¹ P_L``: one Cholesky factorisation of the landmark kernel serves every
target column and every pool chunk, so memory is ``O(chunk · L + N · T)``.

Deviation from the official code: the RBF bandwidth (median heuristic) is computed ONCE from a
seeded subset of landmarks, not re-drawn for every target sample (paper §12, item 14), so results are
deterministic and identical across targets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from idistill_core.errors import ConfigError, DataError, NumericalError
from idistill_core.hashing import config_fingerprint

logger = logging.getLogger("idistill")


AUTO = "auto"


@dataclass(frozen=True)
class PropagateConfig:
    """How landmark influences are spread to the pool.

    ``kernel``, ``ridge`` and ``bandwidth_scale`` may each be ``auto``: chosen by K-fold cross-validation over
    the landmarks (:func:`idistill_core.kernel_select.select_kernel`), which predicts the landmarks' own
    gradients and so keeps the coefficients target-independent. Fixed values (the default) skip it.
    """

    kernel: Literal["rbf", "linear", "auto"] = "rbf"
    """``rbf``: exp(−‖x−y‖²/(2σ²)), σ by the median heuristic (official code); ``linear``: ``x·y``; ``auto``: the
    one of the two with the lower cross-validated error."""
    ridge: float | Literal["auto"] = 1e-2
    """Relative ridge: ``ridge · mean(diag K)`` is added to the diagonal (official ``damp``); > 0; ``auto``: the
    best of ``ridge_grid``."""
    bandwidth_scale: float | Literal["auto"] = 1.0
    """RBF σ = ``bandwidth_scale`` × the median-heuristic σ (1 = the official code); > 0; ``auto``: the best of
    ``bandwidth_grid``."""
    bandwidth_sample: int = 1000
    """At most this many landmarks (seeded subset) enter the median heuristic; >= 2."""
    chunk_size: int = 4096
    """Pool rows per kernel block; bounds memory at ``chunk_size · L`` floats; >= 1."""
    seed: int = 0
    """Seed of the bandwidth subset, the cross-validation folds and the random directions."""
    ridge_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    """Relative ridges tried when ``ridge`` is ``auto``."""
    bandwidth_grid: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    """Multipliers of the median σ tried when ``bandwidth_scale`` is ``auto``."""
    cv_folds: int = 5
    """Folds over the landmarks for ``auto`` (capped at L); >= 2."""
    cv_directions: int = 64
    """``auto`` scores held-out predictions of ``g · r`` for this many seeded Gaussian directions ``r`` (an
    unbiased estimate of the gradient error at a fraction of the cost); 0 = the whole gradient vectors."""

    def __post_init__(self) -> None:
        if self.kernel not in ("rbf", "linear", AUTO):
            raise ConfigError(f"PropagateConfig.kernel must be 'rbf', 'linear' or 'auto'; got {self.kernel!r}")
        for name in ("ridge", "bandwidth_scale"):
            value = getattr(self, name)
            if value != AUTO and (isinstance(value, (str, bool)) or not float(value) > 0):
                raise ConfigError(f"PropagateConfig.{name} must be > 0 or 'auto'; got {value!r}")
        for name in ("ridge_grid", "bandwidth_grid"):
            grid = getattr(self, name)
            if not isinstance(grid, tuple) or not grid or any(isinstance(v, (str, bool)) or not v > 0 for v in grid):
                raise ConfigError(f"PropagateConfig.{name} must be a non-empty tuple of values > 0; got {grid!r}")
        if self.cv_folds < 2:
            raise ConfigError(f"PropagateConfig.cv_folds must be >= 2; got {self.cv_folds}")
        if self.cv_directions < 0:
            raise ConfigError(f"PropagateConfig.cv_directions must be >= 0; got {self.cv_directions}")
        if self.bandwidth_sample < 2:
            raise ConfigError(f"PropagateConfig.bandwidth_sample must be >= 2; got {self.bandwidth_sample}")
        if self.chunk_size < 1:
            raise ConfigError(f"PropagateConfig.chunk_size must be >= 1; got {self.chunk_size}")

    @property
    def needs_selection(self) -> bool:
        """True when a field is ``auto`` (the landmark gradients are needed to fit)."""
        return AUTO in (self.kernel, self.ridge, self.bandwidth_scale)

    def fingerprint(self) -> str:
        return config_fingerprint(self)


def _as_float64(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach()
    t = t.to(device="cpu", dtype=torch.float64)
    if t.ndim != 2:
        raise DataError(f"{name} must be 2-D; got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise NumericalError(f"{name} has non-finite entries")
    return t


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(n, m)`` squared Euclidean distances, clamped at 0 (the norm expansion can dip below)."""
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return d.clamp_min(0)


def median_bandwidth(emb: torch.Tensor, sample: int, seed: int) -> float:
    """σ = sqrt(median pairwise squared distance) over a seeded subset (off-diagonal pairs), floor 1e-6.

    The median is ``torch.median``'s lower median for an even number of pairs.

    Args:
        emb: ``(L, D)`` landmark embeddings.
        sample: subset size cap.
        seed: subset seed (``torch.Generator``).
    """
    n = emb.shape[0]
    if n > sample:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample]
        emb = emb[idx]
    d = squared_distances(emb, emb)
    iu = torch.triu_indices(d.shape[0], d.shape[0], offset=1)
    pairs = d[iu[0], iu[1]]
    if pairs.numel() == 0:
        return 1.0
    return max(float(pairs.median().sqrt()), 1e-6)


class KernelRidge:
    """Kernel ridge regression from landmark embeddings; fit once, predict any number of columns.

    Attributes:
        landmarks: ``(L, D)`` float64 landmark embeddings.
        config: the ``PropagateConfig``.
        sigma: RBF bandwidth (None for the linear kernel).
        ridge_abs: the absolute ridge ``config.ridge · mean(diag K)`` added to the diagonal.
    """

    def __init__(
        self,
        landmarks: torch.Tensor,
        config: PropagateConfig,
        sigma: float | None,
        ridge_abs: float,
        chol: torch.Tensor,
    ):
        self.landmarks = landmarks
        self.config = config
        self.sigma = sigma
        self.ridge_abs = ridge_abs
        self._chol = chol

    @classmethod
    def fit(
        cls, landmark_emb: torch.Tensor | np.ndarray, config: PropagateConfig | None = None
    ) -> KernelRidge:
        """Factorise ``K(L, L) + λI`` once (float64 Cholesky).

        Args:
            landmark_emb: ``(L, D)``.
            config: defaults to ``PropagateConfig()``.

        Raises:
            NumericalError: the regularised kernel is not positive definite (e.g. duplicate landmarks
                with a linear kernel and a ridge too small to matter).
        """
        config = config or PropagateConfig()
        if config.needs_selection:
            raise ConfigError(
                "PropagateConfig has 'auto' fields; choose them first with kernel_select.select_kernel "
                "(it needs the landmark gradients)"
            )
        lm = _as_float64(landmark_emb, "landmark_emb")
        if lm.shape[0] == 0:
            raise DataError("landmark_emb has no rows")
        sigma = None
        if config.kernel == "rbf":
            sigma = median_bandwidth(lm, config.bandwidth_sample, config.seed) * float(config.bandwidth_scale)
        model = cls(lm, config, sigma, 0.0, torch.empty(0))
        k = model.kernel(lm)
        ridge_abs = config.ridge * float(k.diagonal().mean())
        k.diagonal().add_(ridge_abs)
        chol, info = torch.linalg.cholesky_ex(k)
        if int(info) != 0:
            raise NumericalError(
                f"landmark kernel + ridge is not positive definite (ridge={config.ridge}); raise PropagateConfig.ridge"
            )
        model.ridge_abs = ridge_abs
        model._chol = chol
        logger.info(
            "propagate: fitted %s kernel on %d landmarks (sigma=%s)", config.kernel, lm.shape[0], sigma
        )
        return model

    def kernel(self, emb: torch.Tensor) -> torch.Tensor:
        """``K(emb, landmarks)`` ``(n, L)`` float64."""
        if self.config.kernel == "linear":
            return emb @ self.landmarks.T
        return torch.exp(-squared_distances(emb, self.landmarks) / (2 * self.sigma**2))

    def _rows(self, emb_chunks: Iterable[torch.Tensor | np.ndarray]) -> Iterator[torch.Tensor]:
        d = self.landmarks.shape[1]
        step = self.config.chunk_size
        for i, chunk in enumerate(emb_chunks):
            block = _as_float64(chunk, f"emb_chunks[{i}]")
            if block.shape[1] != d:
                raise DataError(f"emb_chunks[{i}] has D={block.shape[1]}; landmarks have D={d}")
            for start in range(0, block.shape[0], step):
                yield block[start : start + step]

    def coefficients(self, emb_chunk: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``C = K(E, L)(K + λI)⁻¹`` ``(n, L)``: each row writes a sample as a landmark combination."""
        rows = [torch.cholesky_solve(self.kernel(b).T, self._chol).T for b in self._rows([emb_chunk])]
        return torch.cat(rows) if rows else torch.empty(0, self.landmarks.shape[0], dtype=torch.float64)

    def iter_predict(
        self, values: torch.Tensor | np.ndarray, emb_chunks: Iterable[torch.Tensor | np.ndarray]
    ) -> Iterator[torch.Tensor]:
        """Stream ``(n_i, T)`` predictions, one per ``chunk_size`` block of the input chunks."""
        vals = _as_float64(values, "values")
        if vals.shape[0] != self.landmarks.shape[0]:
            raise DataError(
                f"values has {vals.shape[0]} rows; expected one per landmark ({self.landmarks.shape[0]})"
            )
        alpha = torch.cholesky_solve(vals, self._chol)  # (L, T), solved once for all columns
        for block in self._rows(emb_chunks):
            yield self.kernel(block) @ alpha

    def predict(
        self, values: torch.Tensor | np.ndarray, emb_chunks: Iterable[torch.Tensor | np.ndarray]
    ) -> torch.Tensor:
        """Propagated values ``(N, T)`` float64 for the concatenated chunks, in input order.

        Args:
            values: ``(L, T)`` landmark values (e.g. ``P_L``; one column is ``(L, 1)``).
            emb_chunks: iterable of ``(n_i, D)`` pool embedding blocks (numpy or torch).
        """
        vals = torch.as_tensor(values)
        parts = list(self.iter_predict(vals, emb_chunks))
        if not parts:
            return torch.empty(0, vals.shape[1], dtype=torch.float64)
        return torch.cat(parts)


# ---------------------------------------------------------------------------------------------------------
# Shared propagation coefficients: C = K(X, X_L)(K_LL + λI)⁻¹, one row per pool sample, for every target
# ---------------------------------------------------------------------------------------------------------
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
        from idistill_core.store import read_by_id

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
            landmarks (:func:`idistill_core.kernel_select.select_kernel`), and the CHOSEN values enter the
            table's fingerprint (a different choice is a different table).
        landmark_grads: ``(L, P)`` the landmarks' gradients in ``landmark_ids`` order; needed only for ``auto``.
        dtype: ``float32`` or ``float16`` storage of the coefficients.
        on_chunk: called with ``(chunks done, chunks total)`` after each commit.
    """
    import json
    import time

    import lancedb
    import pyarrow as pa

    from idistill_core.hashing import ids_hash

    start = time.perf_counter()
    import pyarrow.compute as pc

    pool = pa.array(list(pool_ids), pa.string()) if not isinstance(pool_ids, pa.Array) else pool_ids
    if pc.count_distinct(pool).as_py() != len(pool):
        raise DataError("pool_ids has duplicate sample ids")
    landmark_ids = list(landmark_ids)
    selection = None
    if config.needs_selection:
        from idistill_core.kernel_select import select_kernel

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
