"""Where the target-independent, per-sample work runs: in this process (``local``) or on a Ray cluster (``ray``).

Two steps are expensive and embarrassingly parallel per sample: JVP embeddings of the pool and exact gradients of
the landmarks. Both are streams ``ids -> (ids, rows)`` that one writer in the caller commits in chunks (LanceDB for
embeddings, safetensors shards for landmark gradients), so the backend only decides where the rows are computed:

- ``local``: the core's own ``embed_samples`` / ``iter_gradients`` on the caller's model, in order;
- ``ray``: the same functions inside a Ray Data actor pool (one model replica per actor, ``num_gpus=1`` per actor
  where the cluster has GPUs), results streamed back to the caller as they finish (any order).

Either way the batches are the local path's batches (``recipe batch_size`` rows of the missing ids, in order), so
the two backends compute the same floats up to kernel and thread-count effects.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idistill_core.errors import ConfigError

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class BackendConfig:
    """The ``backend:`` block of a profile (or ``idistill select --backend/--ray-address``)."""

    name: str = "local"
    """`local`: in this process (default); `ray`: a Ray Data actor pool on ``ray_address``."""
    ray_address: str | None = None
    """Cluster to join: ``auto`` (the cluster this process runs in, e.g. a Ray job), ``host:port`` (GCS),
    ``ray://host:10001`` (Ray Client); None starts a private local cluster for the run and stops it after."""
    num_actors: int = 1
    """Model replicas (actors). On a GPU cluster: the number of GPUs to use."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor; torch in the actor uses this many threads."""
    gpus_per_actor: float | None = None
    """None: 1 when the cluster has GPUs, else 0 (CPU actors)."""
    ray_job_address: str | None = None
    """Ray dashboard URL (``http://head:8265``): the Dagster assets submit their driver there as a Ray job
    (dagster-ray ``PipesRayJobClient``; needs ``ray[default]`` on the cluster). None: Dagster runs the driver as a
    local subprocess (Dagster Pipes too) that joins ``ray_address``. The CLI never uses it."""
    object_store_mb: int | None = None
    """Object store cap of a local cluster this process starts (None: Ray's default, 30% of RAM)."""
    samples_per_task: int = 64
    """Samples per Ray task (rounded up to a multiple of the recipe's batch size): the unit of scheduling and
    of retry after an actor dies."""
    max_restarts: int = 3
    """Times Ray restarts a dead actor (and retries its task) before the job fails."""
    pool_uri: str | None = None
    """Where the driver writes the tokenized rows to compute (one Lance table per job, dropped after it) for the
    workers to read their own window of: a folder every node sees, or an object-store URI (``s3://bucket/path``,
    credentials and endpoint from the usual ``AWS_*`` variables on every node). None: a temporary folder on the
    driver's machine, which only a cluster on that machine can read."""

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise ConfigError(f"backend.name must be one of {', '.join(BACKENDS)}; got {self.name!r}.")
        if self.num_actors < 1:
            raise ConfigError(f"backend.num_actors must be >= 1; got {self.num_actors}.")
        if self.cpus_per_actor <= 0:
            raise ConfigError(f"backend.cpus_per_actor must be > 0; got {self.cpus_per_actor}.")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError(f"backend.gpus_per_actor must be >= 0 or null; got {self.gpus_per_actor}.")
        if self.samples_per_task < 1:
            raise ConfigError(f"backend.samples_per_task must be >= 1; got {self.samples_per_task}.")
        if self.max_restarts < 0:
            raise ConfigError(f"backend.max_restarts must be >= 0; got {self.max_restarts}.")
        if self.object_store_mb is not None and self.object_store_mb < 1:
            raise ConfigError(f"backend.object_store_mb must be >= 1 or null; got {self.object_store_mb}.")
        for name in ("cpus_per_actor", "gpus_per_actor"):
            value = getattr(self, name)
            if value is not None and math.isnan(value):  # NaN passes every comparison above
                raise ConfigError(f"backend.{name} must be a number; got {value}.")


LOCAL = BackendConfig()


@dataclass(frozen=True)
class ModelSource:
    """What a remote worker loads to get the caller's model: a spec and the fingerprint it must have.

    A worker that loads weights with another fingerprint refuses to compute, so rows of two models never mix.
    On a cluster the spec must resolve on every node (a hub id in a shared cache, or a path on shared storage).
    """

    spec: str
    fingerprint: str
    cache_dir: str | None = None

    @classmethod
    def of(cls, loaded, cache_dir: str | Path | None = None) -> ModelSource:
        """From a ``models.LoadedModel``."""
        return cls(loaded.spec, loaded.fingerprint, None if cache_dir is None else str(cache_dir))


def _module(backend: BackendConfig | None):
    if backend is None or backend.name == "local":
        from idistill_core.backends import local

        return local
    from idistill_core.backends import ray as ray_backend

    return ray_backend


def _source_for(backend: BackendConfig | None, source: ModelSource | None) -> None:
    if backend is not None and backend.name != "local" and source is None:
        raise ConfigError(
            f"backend '{backend.name}' needs a ModelSource (the spec workers load the model from)."
        )


def embed_stream(
    backend: BackendConfig | None,
    model,
    source: ModelSource | None,
    examples,
    ids: Sequence[str],
    pad_id: int,
    config,
    progress: bool = False,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """``(ids, (n, D) float32)`` JVP embeddings of ``ids`` of the tokenized ``examples``, computed on ``backend``."""
    _source_for(backend, source)
    return _module(backend).embed_stream(
        backend or LOCAL, model, source, examples, ids, pad_id, config, progress
    )


def gradient_stream(
    backend: BackendConfig | None,
    model,
    source: ModelSource | None,
    examples,
    ids: Sequence[str],
    pad_id: int,
    config,
    preconditioner=None,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """``(ids, (n, P) float32)`` reduced per-sample gradients of ``ids``, computed on ``backend``."""
    _source_for(backend, source)
    return _module(backend).gradient_stream(
        backend or LOCAL, model, source, examples, ids, pad_id, config, preconditioner
    )


def select_rows(examples, ids: Sequence[str]):
    """The tokenized ``examples`` rows of ``ids``, in that order (a ``datasets.Dataset``)."""
    position = {sample_id: i for i, sample_id in enumerate(examples["sample_id"])}
    unknown = [s for s in ids if s not in position]
    if unknown:
        raise ConfigError(f"sample ids {unknown[:5]} are not in the tokenized pool.")
    return examples.select([position[s] for s in ids])
