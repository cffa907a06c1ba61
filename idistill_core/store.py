"""EmbeddingStore: JVP embeddings of the pool in an embedded LanceDB table, reused across targets.

One row per pool sample: ``sample_id`` (first column, the merge key), ``vector`` (fixed-size list of float16,
cast explicitly before every write: lancedb#3602 silently misplaces variable-size list vectors), plus
``model_fingerprint`` and ``recipe`` columns. The table's schema metadata records the model fingerprint, the
embedding recipe fingerprint and the dimension; opening a table with a different model or recipe is refused,
so vectors from two models are never mixed.

Writes are insert-if-missing (``merge_insert`` keyed by ``sample_id``), committed chunk by chunk: a killed run
keeps every committed chunk and re-running it embeds only the ids that are still missing. Every commit (create,
merge, optimize) holds an inter-process file lock next to the table, so concurrent writers never lose or
duplicate rows.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from idistill_core.errors import NumericalError, StoreError

logger = logging.getLogger("idistill")

_META_KEY = b"idistill"


@dataclass(frozen=True)
class StoreIdentity:
    """What a table's vectors depend on; a table only ever holds vectors of one identity."""

    model_fingerprint: str
    recipe: str
    dim: int

    def to_json(self) -> bytes:
        return json.dumps(
            {"model_fingerprint": self.model_fingerprint, "recipe": self.recipe, "dim": self.dim},
            sort_keys=True,
        ).encode()


def _schema(identity: StoreIdentity) -> pa.Schema:
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float16(), identity.dim)),
            pa.field("model_fingerprint", pa.string()),
            pa.field("recipe", pa.string()),
        ],
        metadata={_META_KEY: identity.to_json()},
    )


def _connect(uri: str | Path):
    from datetime import timedelta

    import lancedb

    Path(uri).mkdir(parents=True, exist_ok=True)
    # interval 0: every read sees the latest commit, so another process's rows are never re-inserted
    return lancedb.connect(str(uri), read_consistency_interval=timedelta(0))


@contextmanager
def _writer_lock(uri: str | Path, name: str):
    """Exclusive inter-process lock for one table's writes (create, merge, optimize).

    Without it, concurrent merges of overlapping ids left duplicate rows, and two processes creating the same
    table made lance commit the second create as an Overwrite of the first one's rows. The lock serialises all
    commits.
    """
    import fcntl

    with open(Path(uri) / f".{name}.writer.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class EmbeddingStore:
    """A LanceDB table of per-sample embeddings, keyed by ``sample_id``.

    Use :meth:`open` to create or open a table; it refuses a table written with another identity.
    """

    def __init__(self, table, identity: StoreIdentity, uri: str, name: str):
        self._table = table
        self.identity = identity
        self.uri = uri
        self.name = name

    @classmethod
    def open(cls, uri: str | Path, name: str, identity: StoreIdentity) -> EmbeddingStore:
        db = _connect(uri)
        with _writer_lock(uri, name):
            table = cls._open_or_create(db, uri, name, identity)
        return cls(table, identity, str(uri), name)

    @staticmethod
    def _open_or_create(db, uri: str | Path, name: str, identity: StoreIdentity):
        if name in db.list_tables().tables:
            table = db.open_table(name)
            found = (table.schema.metadata or {}).get(_META_KEY)
            if found is None:
                raise StoreError(f"LanceDB table '{name}' in {uri} was not written by idistill; use a new table name.")
            stored = json.loads(found)
            wanted = json.loads(identity.to_json())
            if stored != wanted:
                diffs = ", ".join(f"{k}={stored.get(k)!r} (run asks {wanted[k]!r})" for k in wanted if stored.get(k) != wanted[k])
                raise StoreError(
                    f"LanceDB table '{name}' in {uri} holds embeddings of another model or recipe: {diffs}; "
                    "use a new table name or delete the table."
                )
        else:
            table = db.create_table(name, schema=_schema(identity), exist_ok=True)
        return table

    # -- reading -------------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self._table.version)

    @property
    def vector_type(self):
        """The Arrow type of the stored ``vector`` column (checks compare it with the declared identity)."""
        return self._table.schema.field("vector").type

    def count(self) -> int:
        return int(self._table.count_rows())

    def sample_ids(self) -> list[str]:
        column = self._table.search().select(["sample_id"]).limit(None).to_arrow().column("sample_id")
        return column.to_pylist()

    def missing_ids(self, sample_ids: Iterable[str]) -> list[str]:
        """The ids (in the given order) that have no row yet."""
        present = set(self.sample_ids())
        return [s for s in sample_ids if s not in present]

    def iter_chunks(self, chunk_size: int = 4096) -> Iterator[tuple[list[str], np.ndarray]]:
        """Stream the whole table as ``(ids, (n, D) float32)`` chunks; memory is one chunk."""
        query = self._table.search().select(["sample_id", "vector"]).limit(None)
        for batch in query.to_batches(chunk_size):
            if batch.num_rows == 0:
                continue
            yield batch.column("sample_id").to_pylist(), _vectors(batch.column("vector"), self.identity.dim)

    def read(self, sample_ids: list[str], chunk_size: int = 4096) -> np.ndarray:
        """``(len(sample_ids), D) float32`` vectors in the order given; every id must be present."""
        wanted = {s: i for i, s in enumerate(sample_ids)}
        out = np.full((len(sample_ids), self.identity.dim), np.nan, dtype=np.float32)
        found = np.zeros(len(sample_ids), dtype=bool)
        for ids, vectors in self.iter_chunks(chunk_size):
            for row, sample_id in enumerate(ids):
                position = wanted.get(sample_id)
                if position is not None:
                    out[position] = vectors[row]
                    found[position] = True
        if not found.all():
            missing = [sample_ids[i] for i in np.flatnonzero(~found)[:5]]
            raise StoreError(f"LanceDB table '{self.name}' has no embedding for sample ids {missing}; embed the pool first.")
        return out

    # -- writing -------------------------------------------------------------------------------------------
    def insert_missing(self, sample_ids: list[str], vectors: np.ndarray, retries: int = 5) -> int:
        """Insert rows whose id is not in the table yet (one commit); returns the number inserted.

        Vectors must be finite: a NaN/Inf row is refused with its sample id, before anything is written.
        """
        vectors = np.asarray(vectors)
        if vectors.shape != (len(sample_ids), self.identity.dim):
            raise StoreError(
                f"embedding chunk has shape {vectors.shape}; expected ({len(sample_ids)}, {self.identity.dim})."
            )
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            bad = sample_ids[int(np.flatnonzero(~finite)[0])]
            raise NumericalError(f"embedding of sample '{bad}' is not finite (NaN/Inf); nothing was written.")
        with np.errstate(over="ignore"):
            half = vectors.astype(np.float16)
        if not np.isfinite(half).all():
            bad = sample_ids[int(np.flatnonzero(~np.isfinite(half).all(axis=1))[0])]
            raise NumericalError(f"embedding of sample '{bad}' overflows float16; nothing was written.")
        n = len(sample_ids)
        table = pa.table(
            {
                "sample_id": pa.array(sample_ids, pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(half.reshape(-1), pa.float16()), self.identity.dim),
                "model_fingerprint": pa.array([self.identity.model_fingerprint] * n, pa.string()),
                "recipe": pa.array([self.identity.recipe] * n, pa.string()),
            },
            schema=_schema(self.identity),
        )
        for attempt in range(retries):
            try:
                with _writer_lock(self.uri, self.name):
                    result = self._table.merge_insert("sample_id").when_not_matched_insert_all().execute(table)
                return int(result.num_inserted_rows)
            except Exception as error:  # lance raises a generic error on commit conflicts
                if "conflict" not in str(error).lower() or attempt == retries - 1:
                    raise
                logger.warning("LanceDB commit conflict on '%s' (attempt %d); retrying", self.name, attempt + 1)
                time.sleep(0.2 * (attempt + 1))
        return 0

    def optimize(self) -> dict:
        """Compact files and prune old versions (run from one writer only)."""
        before = self.version
        with _writer_lock(self.uri, self.name):
            self._table.optimize()
        return {"version_before": before, "version_after": self.version}


def _vectors(column: pa.Array, dim: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim).astype(np.float32)
