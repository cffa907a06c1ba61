"""EmbeddingStore: JVP embeddings of the pool in an embedded LanceDB table, reused across targets and pools.

One row per pool sample: ``sample_id`` (first column, the table's declared primary key), ``vector`` (fixed-size
list of float16, or float32 where the identity says so, cast explicitly before every write: lancedb#3602 silently misplaces variable-size list
vectors), plus ``model_fingerprint`` and ``recipe`` columns. The table's schema metadata records the model
fingerprint, the embedding recipe fingerprint and the dimension; opening a table with a different model or
recipe is refused, so vectors from two models are never mixed.

Made for millions of rows:

- Writes are insert-if-missing (``merge_insert`` on the declared key), split into commits of a bounded size in
  MB: a killed run keeps every committed chunk and re-running it embeds only the ids still missing. No file
  lock: the key is declared in the schema the table is created with (one commit, so no process ever sees the
  table without it), and LanceDB's commit protocol then serialises concurrent creates and merges: a losing
  create opens the winner's table, a conflicting merge is rebased by lance and retried here. Merges scan the key
  column rather than its index (see :meth:`_merge`: index-assisted concurrent merges duplicated ids).
- A BTREE scalar index on ``sample_id`` is built once rows exist; :meth:`optimize` (compaction into fragments of
  up to ``FRAGMENT_ROWS`` rows + index update) runs after large appends and at the end of every embedding pass
  (``pipeline.embeddings``), so reads of a set of ids stay index lookups over a few files: a pass that commits
  every 256 rows otherwise leaves one fragment per commit and an index covering only the first one.
- Reads of a set of ids are one filtered Arrow scan plus a vectorised reorder (``pyarrow.compute.index_in``):
  no Python loop over rows; the table's other rows are never decoded.
- :meth:`at_version` pins a read-only view at a Lance version (time travel): what downstream consumers read
  does not move when another process appends.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from idistill_core.errors import IdistillError, NumericalError, StoreError
from idistill_core.store import faults

logger = logging.getLogger("idistill")

_META_KEY = b"idistill"
# Lance's field metadata for an unenforced primary key (what ``set_unenforced_primary_key`` writes); declaring
# it in the create schema makes the key part of the table's first commit.
_PRIMARY_KEY = {b"lance-schema:unenforced-primary-key:position": b"1"}
_ROW_OVERHEAD_BYTES = 64
"""Approximate bytes per row besides the vector (id string, fingerprint and recipe columns, offsets)."""
FRAGMENT_ROWS = 1 << 18
"""Rows per compacted fragment (512 MiB of float16 vectors at D = 1024). Compaction rewrites only fragments below
this size, so an optimize after a small append to a large table rewrites at most one partly filled fragment plus
the new ones, not the table (LanceDB's default target, 1M rows, made a 256-row append to a 1M table rewrite it)."""


@dataclass(frozen=True)
class StoreIdentity:
    """What a table's vectors depend on; a table only ever holds vectors of one identity."""

    model_fingerprint: str
    recipe: str
    dim: int
    dtype: str = "float16"
    """Stored vector dtype: ``float16`` (JVP embeddings) or ``float32`` (RDS+ features, whose cosines rank)."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise StoreError(f"StoreIdentity.dtype must be one of {', '.join(_DTYPES)}; got {self.dtype!r}.")

    def to_json(self) -> bytes:
        fields = {"model_fingerprint": self.model_fingerprint, "recipe": self.recipe, "dim": self.dim}
        if self.dtype != "float16":  # float16 tables written before the field existed keep their identity
            fields["dtype"] = self.dtype
        return json.dumps(fields, sort_keys=True).encode()


_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def _schema(identity: StoreIdentity) -> pa.Schema:
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False, metadata=_PRIMARY_KEY),
            pa.field("vector", pa.list_(_DTYPES[identity.dtype], identity.dim)),
            pa.field("model_fingerprint", pa.string()),
            pa.field("recipe", pa.string()),
        ],
        metadata={_META_KEY: identity.to_json()},
    )


def _connect(uri: str | Path):
    import lancedb

    if "://" not in str(uri):  # an object-store URI (s3://bucket/path, gs://, az://) has no folder to create
        Path(uri).mkdir(parents=True, exist_ok=True)
    # interval 0: every read sees the latest commit, so another process's rows are never re-inserted
    return lancedb.connect(str(uri), read_consistency_interval=timedelta(0))


def _is_conflict(error: Exception) -> bool:
    text = str(error).lower()
    return "conflict" in text or "retryable" in text or "already exists" in text


@contextmanager
def damaged_table(name: str, uri: str | Path | None = None):
    """Turn what lance or Arrow raise for a table it cannot read (a truncated data file, a garbage manifest or
    index) into one StoreError naming the table and the fix; idistill's own errors pass through."""
    try:
        yield
    except IdistillError:
        raise
    except (OSError, RuntimeError, ValueError, pa.ArrowException) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = re.sub(r",\s*/\S+\.rs:\d+(:\d+)?", "", reason)  # the Rust source line lance appends
        where = f" in {uri}" if uri is not None else ""
        raise StoreError(
            f"LanceDB table '{name}'{where} cannot be read, it is damaged ({reason[:300]}); delete the table "
            "(or use another store) and re-run."
        ) from error


def _as_id_array(sample_ids: Iterable[str] | pa.Array) -> pa.Array:
    if isinstance(sample_ids, pa.ChunkedArray):
        sample_ids = sample_ids.combine_chunks()
    if isinstance(sample_ids, pa.Array):
        return sample_ids.cast(pa.string())
    return pa.array(list(sample_ids), pa.string())


def read_by_id(dataset, sample_ids: Iterable[str] | pa.Array, columns: list[str], name: str, hint: str) -> pa.Table:
    """Rows of a Lance dataset keyed by ``sample_id``, in the order of ``sample_ids``; every id must be present.

    One scan filtered on the key (a BTREE index lookup when the index exists), then a vectorised reorder
    (``pyarrow.compute.index_in``).
    """
    wanted = _as_id_array(sample_ids)
    if len(wanted) == 0:
        return dataset.schema.empty_table().select(columns)
    with damaged_table(name):
        found = dataset.to_table(columns=columns, filter=pc.field("sample_id").isin(wanted))
    position = pc.index_in(wanted, value_set=found.column("sample_id"))
    if position.null_count:
        missing = wanted.filter(position.is_null()).to_pylist()[:5]
        raise StoreError(f"LanceDB table '{name}' has no row for sample ids {missing}; {hint}.")
    return found.take(position)


class EmbeddingStore:
    """A LanceDB table of per-sample embeddings, keyed by ``sample_id``.

    Use :meth:`open` to create or open a table; it refuses a table written with another identity.
    """

    def __init__(self, table, identity: StoreIdentity, uri: str, name: str, pinned: int | None = None):
        self._table = table
        self.identity = identity
        self.uri = uri
        self.name = name
        self._pinned = pinned
        self._pinned_dataset = None

    @classmethod
    def open(
        cls, uri: str | Path, name: str, identity: StoreIdentity, version: int | None = None
    ) -> EmbeddingStore:
        """Open (creating if needed) the table; with ``version`` a read-only view pinned at that Lance version."""
        db = _connect(uri)
        table = cls._open_or_create(db, uri, name, identity)
        store = cls(table, identity, str(uri), name)
        return store if version is None else store.at_version(version)

    @staticmethod
    def _open_or_create(db, uri: str | Path, name: str, identity: StoreIdentity, retries: int = 10):
        for attempt in range(retries):
            try:
                if name in db.list_tables().tables:
                    table = db.open_table(name)
                else:
                    table = db.create_table(name, schema=_schema(identity), exist_ok=True)
                break
            except Exception as error:
                # Two processes creating at once: lance commits one create; the other fails its commit (or its
                # exist_ok schema check on a table another process already evolved) and opens the winner's. A
                # table can also be listed before its creator's first commit lands ("not found" on open).
                if attempt == retries - 1:
                    with damaged_table(name, uri):  # still failing: a manifest lance cannot parse
                        raise
                logger.info("LanceDB create of '%s' raced another writer (%s); reopening", name, error)
                time.sleep(0.05 * (attempt + 1))
        found = (table.schema.metadata or {}).get(_META_KEY)
        if found is None:
            raise StoreError(
                f"LanceDB table '{name}' in {uri} was not written by idistill; use a new table name."
            )
        stored = json.loads(found)
        wanted = json.loads(identity.to_json())
        if stored != wanted:
            diffs = ", ".join(
                f"{k}={stored.get(k)!r} (run asks {wanted[k]!r})"
                for k in wanted
                if stored.get(k) != wanted[k]
            )
            raise StoreError(
                f"LanceDB table '{name}' in {uri} holds embeddings of another model or recipe: {diffs}; "
                "use a new table name or delete the table."
            )
        if not (table.schema.field("sample_id").metadata or {}).get(next(iter(_PRIMARY_KEY))):
            # a table from before the key was declared at create time: declare it once (idempotent on races)
            try:
                table.set_unenforced_primary_key("sample_id")
            except Exception as error:
                if "already set" not in str(error):
                    raise
        return table

    def at_version(self, version: int) -> EmbeddingStore:
        """A read-only view of this table as it was at Lance ``version`` (later appends are invisible)."""
        version = int(version)
        try:
            dataset = self._table.to_lance().checkout_version(version)
        except Exception as error:
            raise StoreError(
                f"LanceDB table '{self.name}' in {self.uri} has no version {version} (pruned or never written): "
                f"{error}; re-materialize the embeddings."
            ) from error
        view = EmbeddingStore(self._table, self.identity, self.uri, self.name, pinned=version)
        view._pinned_dataset = dataset
        return view

    # -- reading -------------------------------------------------------------------------------------------
    def _dataset(self):
        with damaged_table(self.name, self.uri):
            return self._pinned_dataset if self._pinned is not None else self._table.to_lance()

    @property
    def version(self) -> int:
        return self._pinned if self._pinned is not None else int(self._table.version)

    @property
    def pinned(self) -> bool:
        return self._pinned is not None

    @property
    def vector_type(self):
        """The Arrow type of the stored ``vector`` column (checks compare it with the declared identity)."""
        return self._table.schema.field("vector").type

    @property
    def primary_key(self) -> str | None:
        """The column LanceDB records as the table's (unenforced) primary key."""
        for field in self._dataset().schema:
            if (field.metadata or {}).get(next(iter(_PRIMARY_KEY))):
                return field.name
        return None

    def count(self) -> int:
        with damaged_table(self.name, self.uri):
            return int(self._dataset().count_rows())

    def id_array(self) -> pa.Array:
        """Every stored ``sample_id`` as one Arrow string array (table order); only that column is decoded."""
        with damaged_table(self.name, self.uri):
            column = self._dataset().to_table(columns=["sample_id"]).column("sample_id")
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)

    def sample_ids(self) -> list[str]:
        return self.id_array().to_pylist()

    def present_mask(self, sample_ids: Iterable[str] | pa.Array) -> np.ndarray:
        """``(n,) bool``: which of ``sample_ids`` have a row (vectorised set membership, no Python loop)."""
        wanted = _as_id_array(sample_ids)
        return pc.is_in(wanted, value_set=self.id_array()).to_numpy(zero_copy_only=False)

    def missing_ids(self, sample_ids: Iterable[str] | pa.Array) -> list[str]:
        """The ids (in the given order) that have no row yet: an anti-join of ``sample_ids`` with the table."""
        wanted = _as_id_array(sample_ids)
        return wanted.filter(pa.array(~self.present_mask(wanted))).to_pylist()

    def read_arrow(self, sample_ids: Sequence[str] | pa.Array) -> pa.Table:
        """Rows ``(sample_id, vector)`` of ``sample_ids`` in the order given; every id must be present.

        One scan filtered on the indexed key, then a vectorised reorder (``index_in``): only the wanted rows
        are decoded and no Python code runs per row.
        """
        return read_by_id(self._dataset(), sample_ids, ["sample_id", "vector"], self.name, "embed the pool first")

    def read(self, sample_ids: Sequence[str] | pa.Array) -> np.ndarray:
        """``(len(sample_ids), D) float32`` vectors in the order given; every id must be present."""
        return _vectors(self.read_arrow(sample_ids).column("vector"), self.identity.dim)

    def iter_chunks(
        self, chunk_size: int = 4096, sample_ids: Sequence[str] | pa.Array | None = None
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """Stream ``(ids, (n, D) float32)`` chunks; memory is one chunk.

        With ``sample_ids`` (a pool): exactly those rows, in that order, ``chunk_size`` at a time (rows of other
        pools never appear). Without: the whole table in table order.
        """
        if sample_ids is not None:
            wanted = _as_id_array(sample_ids)
            for start in range(0, len(wanted), chunk_size):
                part = wanted.slice(start, chunk_size)
                yield part.to_pylist(), self.read(part)
            return
        batches = iter(self._dataset().to_batches(columns=["sample_id", "vector"], batch_size=chunk_size))
        while True:
            with damaged_table(self.name, self.uri):
                batch = next(batches, None)
            if batch is None:
                return
            if batch.num_rows == 0:
                continue
            yield batch.column("sample_id").to_pylist(), _vectors(batch.column("vector"), self.identity.dim)

    # -- writing -------------------------------------------------------------------------------------------
    def rows_per_commit(self, commit_mb: float) -> int:
        """How many rows fit a commit of ``commit_mb`` megabytes (the vector plus row overhead)."""
        itemsize = np.dtype(self.identity.dtype).itemsize
        return max(1, int(commit_mb * 2**20 // (itemsize * self.identity.dim + _ROW_OVERHEAD_BYTES)))

    def _require_writable(self) -> None:
        if self._pinned is not None:
            raise StoreError(
                f"this view of '{self.name}' is pinned at version {self._pinned}; writes go to the latest."
            )

    def insert_missing(
        self,
        sample_ids: Sequence[str],
        vectors: np.ndarray,
        retries: int = 5,
        commit_mb: float = 64.0,
        optimize_after_rows: int = 100_000,
    ) -> int:
        """Insert rows whose id is not in the table yet; returns the number inserted.

        Vectors must be finite: a NaN/Inf row is refused with its sample id, before anything is written.
        Large inputs are split into commits of at most ``commit_mb`` MB; the key index is built when the first
        rows land and :meth:`optimize` runs once ``optimize_after_rows`` rows were added in one call.
        """
        self._require_writable()
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
            half = vectors.astype(self.identity.dtype)
        if not np.isfinite(half).all():
            bad = sample_ids[int(np.flatnonzero(~np.isfinite(half).all(axis=1))[0])]
            raise NumericalError(f"embedding of sample '{bad}' overflows {self.identity.dtype}; nothing was written.")
        ids = _as_id_array(sample_ids)
        step = self.rows_per_commit(commit_mb)
        inserted = 0
        for start in range(0, len(ids), step):
            stop = min(start + step, len(ids))
            inserted += self._merge(self._arrow(ids.slice(start, stop - start), half[start:stop]), retries)
        if inserted:
            if not self.has_key_index():
                self.ensure_index()
            elif inserted >= optimize_after_rows:
                self.optimize()
        return inserted

    def _arrow(self, ids: pa.Array, half: np.ndarray) -> pa.Table:
        n = len(ids)
        return pa.table(
            {
                "sample_id": ids,
                "vector": pa.FixedSizeListArray.from_arrays(
                    pa.array(half.reshape(-1), _DTYPES[self.identity.dtype]), self.identity.dim
                ),
                "model_fingerprint": pa.array([self.identity.model_fingerprint] * n, pa.string()),
                "recipe": pa.array([self.identity.recipe] * n, pa.string()),
            },
            schema=_schema(self.identity),
        )

    def _merge(self, table: pa.Table, retries: int) -> int:
        for attempt in range(retries):
            try:
                # use_index(False): with the BTREE index on the key, concurrent index-assisted merges left duplicate
                # ids (3 of 3 runs of tests/reliability/test_concurrency.py); scanning the key column did not (3 of 3
                # clean) and costs one string column per commit.
                merge = self._table.merge_insert("sample_id").when_not_matched_insert_all().use_index(False)
                faults.point("store.commit.before")
                result = merge.execute(table)
                faults.point("store.commit.after")
                return int(result.num_inserted_rows)
            except Exception as error:  # lance raises a generic error when its own retries are exhausted
                if not _is_conflict(error) or attempt == retries - 1:
                    raise
                logger.warning(
                    "LanceDB commit conflict on '%s' (attempt %d); retrying", self.name, attempt + 1
                )
                time.sleep(0.2 * (attempt + 1))
        return 0

    def restore(self, version: int, expected_latest: int | None = None) -> int | None:
        """Roll the table back to ``version``: one new commit whose rows are that version's.

        With ``expected_latest``, nothing is done (None is returned) when the latest version is another one,
        i.e. another writer committed since (checked just before the commit: a writer committing in between
        the check and the restore would lose its rows, which its own re-run inserts again); otherwise returns
        the new version.
        """
        self._require_writable()
        if expected_latest is not None and self.version != expected_latest:
            return None
        faults.point("store.commit.before")
        self._table.restore(version)
        faults.point("store.commit.after")
        return self.version

    def has_key_index(self) -> bool:
        return any(index.columns == ["sample_id"] for index in self._table.list_indices())

    def ensure_index(self) -> None:
        """Build the BTREE index on ``sample_id`` if the table has rows and no such index yet."""
        from lancedb.index import BTree

        self._require_writable()
        if self.has_key_index() or self._table.count_rows() == 0:
            return
        try:
            self._table.create_index("sample_id", config=BTree(), replace=False)
        except Exception as error:  # another writer built it first
            if not self.has_key_index():
                raise StoreError(f"could not index sample_id of '{self.name}': {error}") from error

    def layout(self) -> dict:
        """``{"rows", "fragments", "unindexed_rows"}``: how the table lies on disk (what :meth:`optimize` fixes)."""
        dataset = self._dataset()
        rows = int(dataset.count_rows())
        unindexed = rows
        for index in self._table.list_indices():
            if index.columns == ["sample_id"]:
                unindexed = int(self._table.index_stats(index.name).num_unindexed_rows)
        return {"rows": rows, "fragments": len(dataset.get_fragments()), "unindexed_rows": unindexed}

    def optimize(self, cleanup_older_than: timedelta | None = None, fragment_rows: int = FRAGMENT_ROWS) -> dict:
        """Compact small fragments into ones of up to ``fragment_rows`` rows, add every row to the key index and
        prune old versions (what LanceDB's ``optimize`` does, with a bounded fragment size; see ``FRAGMENT_ROWS``).

        Versions younger than ``cleanup_older_than`` (default: 7 days, LanceDB's) stay readable, so views pinned
        by recent materializations keep working.

        Returns:
            versions and :meth:`layout` before and after, and the seconds it took.
        """
        self._require_writable()
        start = time.perf_counter()
        before, layout_before = self.version, self.layout()
        self.ensure_index()
        for attempt in range(5):
            try:
                # index first: lance does not compact indexed and unindexed fragments together, so a table whose
                # index covers only its first commit would keep that fragment apart
                self._table.to_lance().optimize.optimize_indices()
                self._table.to_lance().optimize.compact_files(target_rows_per_fragment=fragment_rows)
                self._table.to_lance().optimize.optimize_indices()  # rows committed meanwhile (none when alone)
                self._table.to_lance().cleanup_old_versions(older_than=cleanup_older_than or timedelta(days=7))
                break
            except Exception as error:
                if not _is_conflict(error) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        return {
            "version_before": before,
            "version_after": self.version,
            "before": layout_before,
            "after": self.layout(),
            "seconds": round(time.perf_counter() - start, 3),
        }


def _vectors(column: pa.Array, dim: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim).astype(np.float32)
