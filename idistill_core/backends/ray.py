"""The Ray backend: the pool's missing ids mapped through ``ray.data`` with an actor pool.

Each actor loads one model replica (``ModelSource``: spec + fingerprint it must match) and runs the core's own
``embed_samples`` or ``iter_gradients`` on its tasks; a task is ``samples_per_task`` ids, cut into the local
path's batches, so an actor computes exactly the batches the local backend would. Ray schedules the tasks,
restarts a killed actor and retries its task (``max_restarts``); results stream back to the caller, which is
the one writer: it commits them in chunks to LanceDB (insert-if-missing keyed by ``sample_id``), so a killed job
resumes from its last commit and a duplicate row from a retried task can never reach the table.

The token ids never travel through the object store: the driver writes the rows to compute once, in task order,
to a Lance table at ``backend.pool_uri`` (a shared folder or an object-store URI; a temporary folder for a local
cluster) and a task is only ``(table, first row, rows)``; each actor reads its own window (issue 24: at 5.8M
samples the old tasks put ~32 GB of token ids into the object store). The table is dropped when the job ends.

Why not ``lance_ray.write_lance`` (workers writing Lance fragments, one commit): it appends, with no key, so a
retried task or a second job on the same table would add a second row for an id; and a single commit at the end
would lose a killed job's work. The store's keyed insert-if-missing, committed every ``commit_every`` rows by
the one writer, gives exactly-once and resume; at ~2 KB per row the driver is far from being the bottleneck (a
5.8M-row pool is ~12 GB of float16 vectors over hours of GPU time).

``ray_address`` None starts a private local cluster for the call (stopped afterwards); any other value joins an
existing cluster (``auto`` from inside a Ray job, ``host:port``, or ``ray://`` for Ray Client). A process that
already called ``ray.init`` (a test, a Dagster Pipes job) is used as it is.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence

import numpy as np

from idistill_core.backends import BackendConfig, ModelSource, select_rows
from idistill_core.errors import ModelError

logger = logging.getLogger("idistill")


@contextlib.contextmanager
def connected(backend: BackendConfig) -> Iterator[None]:
    """Ray initialised for the duration: the caller's connection if there is one, else a new one (closed after)."""
    import ray

    if ray.is_initialized():
        yield
        return
    if backend.ray_address is None:
        memory = None if backend.object_store_mb is None else backend.object_store_mb * 1024**2
        ray.init(address="local", include_dashboard=False, object_store_memory=memory, log_to_driver=True)
    else:
        ray.init(address=backend.ray_address, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


class _Worker:
    """One model replica; ``__call__`` maps a block of tasks (pyarrow) to ``{sample_id, value}`` rows."""

    def __init__(
        self, source: ModelSource, kind: str, config, pad_id: int, attn: str | None, preconditioner=None
    ):
        import torch

        from idistill_core.models.loading import load_model

        loaded = load_model(source.spec, attn_implementation=attn, cache_dir=source.cache_dir)
        if loaded.fingerprint != source.fingerprint:
            raise ModelError(
                f"Ray worker loaded '{source.spec}' with fingerprint {loaded.fingerprint}, the caller has "
                f"{source.fingerprint}: the spec must resolve to the same weights on every node."
            )
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = loaded.model.to(device)
        self.kind = kind
        self.config = config
        self.pad_id = pad_id
        self.preconditioner = preconditioner

    def _window(self, uri: str, table: str, offset: int, count: int):
        """Rows ``offset .. offset+count`` of the job's pool table, read by this actor (its own I/O)."""
        import lancedb

        key = (uri, table)
        if getattr(self, "_table_key", None) != key:
            self._dataset = lancedb.connect(uri).open_table(table).to_lance()
            self._table_key = key
        return self._dataset.to_table(columns=list(_COLUMNS), offset=offset, limit=count)

    def __call__(self, block) -> dict[str, np.ndarray]:
        from idistill_core.data.batch import iter_batches

        examples = []
        for uri, table, offset, count in zip(
            block.column("uri").to_pylist(), block.column("table").to_pylist(),
            block.column("offset").to_pylist(), block.column("count").to_pylist(), strict=True,
        ):
            rows = self._window(uri, table, offset, count)
            examples += [
                {"sample_id": s, "input_ids": i, "labels": lab}
                for s, i, lab in zip(
                    rows.column("sample_id").to_pylist(), rows.column("input_ids").to_pylist(),
                    rows.column("labels").to_pylist(), strict=True,
                )
            ]
        batches = iter_batches(examples, self.config.batch_size, self.pad_id)
        ids: list[str] = []
        rows: list[np.ndarray] = []
        if self.kind == "embed":
            from idistill_core.steps.embed import embed_samples

            for sample_ids, vectors in embed_samples(self.model, batches, self.config):
                ids += sample_ids
                rows.append(vectors)
        else:
            from idistill_core.steps.gradients import iter_gradients

            for sample_ids, grads in iter_gradients(self.model, batches, self.config, self.preconditioner):
                ids += sample_ids
                rows.append(grads.detach().float().cpu().numpy())
        return {"sample_id": np.asarray(ids, dtype=object), "value": np.concatenate(rows).astype(np.float32)}


_COLUMNS = {"sample_id": "string", "input_ids": "list<int32>", "labels": "list<int32>"}


@contextlib.contextmanager
def pool_table(examples, ids: Sequence[str], pool_uri: str | None, rows_per_write: int = 4096):
    """The tokenized rows of ``ids`` (in that order) written once to a Lance table for the workers:
    ``(uri, table name)``; dropped (and a temporary folder removed) on exit."""
    import lancedb
    import pyarrow as pa

    folder = None
    if pool_uri is None:
        folder = tempfile.mkdtemp(prefix="idistill-ray-pool-")
    uri = pool_uri or folder
    schema = pa.schema([("sample_id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
    rows = select_rows(examples, ids).with_format("arrow")

    def batches():
        for start in range(0, len(ids), rows_per_write):
            part = rows[start : start + rows_per_write]
            yield pa.RecordBatch.from_arrays([part.column(c).combine_chunks().cast(schema.field(c).type) for c in _COLUMNS], schema=schema)

    name = f"ray_pool_{uuid.uuid4().hex[:12]}"
    db = lancedb.connect(uri)
    try:
        db.create_table(name, data=pa.RecordBatchReader.from_batches(schema, batches()), schema=schema)
        yield uri, name
    finally:
        with contextlib.suppress(Exception):
            db.drop_table(name)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _tasks(uri: str, table: str, num_ids: int, samples_per_task: int, batch_size: int):
    """One single-row Arrow table per task (one block per task: the unit Ray schedules and retries), naming only
    its window of the pool table: ``(uri, table, offset, count)``."""
    import pyarrow as pa

    step = -(-samples_per_task // batch_size) * batch_size
    return [
        pa.table({"uri": [uri], "table": [table], "offset": [start], "count": [min(step, num_ids - start)]})
        for start in range(0, num_ids, step)
    ]


def _stream(
    backend: BackendConfig,
    kind: str,
    source: ModelSource,
    examples,
    ids: Sequence[str],
    pad_id: int,
    config,
    attn: str | None,
    preconditioner=None,
) -> Iterator[tuple[list[str], np.ndarray]]:
    if not ids:
        return
    import ray
    import ray.data

    with connected(backend), pool_table(examples, ids, backend.pool_uri) as (uri, table):
        gpus = backend.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        tasks = _tasks(uri, table, len(ids), backend.samples_per_task, config.batch_size)
        logger.info(
            "ray: %d samples in %d tasks over %d actor(s) (%g CPU, %g GPU each) on %s",
            len(ids),
            len(tasks),
            backend.num_actors,
            backend.cpus_per_actor,
            gpus,
            backend.ray_address or "a local cluster",
        )
        dataset = ray.data.from_arrow(tasks).map_batches(
            _Worker,
            fn_constructor_kwargs={
                "source": source,
                "kind": kind,
                "config": config,
                "pad_id": pad_id,
                "attn": attn,
                "preconditioner": preconditioner,
            },
            batch_size=None,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=backend.num_actors),
            num_cpus=backend.cpus_per_actor,
            num_gpus=gpus,
            max_restarts=backend.max_restarts,
            max_task_retries=backend.max_restarts,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            yield [str(s) for s in batch["sample_id"]], np.asarray(batch["value"], dtype=np.float32)


def embed_stream(
    backend: BackendConfig,
    model,
    source: ModelSource,
    examples,
    ids: Sequence[str],
    pad_id: int,
    config,
    progress: bool = False,
) -> Iterator[tuple[list[str], np.ndarray]]:
    # eager attention: the JVP needs forward-mode AD, which the CPU sdpa kernel lacks
    return _stream(backend, "embed", source, examples, ids, pad_id, config, "eager")


def gradient_stream(
    backend: BackendConfig,
    model,
    source: ModelSource,
    examples,
    ids: Sequence[str],
    pad_id: int,
    config,
    preconditioner=None,
) -> Iterator[tuple[list[str], np.ndarray]]:
    return _stream(backend, "gradients", source, examples, ids, pad_id, config, None, preconditioner)
