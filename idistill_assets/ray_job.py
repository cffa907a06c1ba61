"""The Ray driver of the ``embeddings`` and ``landmarks`` assets, launched through Dagster Pipes.

Why Pipes and not dagster-ray's ``ray_executor`` / ``RayRunLauncher``: the executor and run launcher move whole
Dagster steps (or runs) into Ray jobs, which would need the Dagster instance's storage, the code location and every
artefact (pool parquet, model, warm-up) reachable from inside the cluster for *every* asset, and would make where a
step runs a property of the job rather than of the profile. With Pipes only the expensive part moves: the asset
stays the same Dagster asset (same key, deps, partitions, checks, blocking check), launches this driver, streams
its log lines and progress into the run, and then runs its ordinary local body, which finds every embedding
committed (or every landmark shard written) and computes the data version, checks and metadata with exactly the
code of the local backend. So the asset graph and the data versions cannot differ between backends.

Two launchers, one driver (this module's ``main``), chosen by the profile's ``backend``:

- ``ray_job_address`` set (a Ray dashboard, e.g. KubeRay's head service ``http://head:8265``): dagster-ray's
  ``PipesRayJobClient`` submits ``python -m idistill_assets.ray_job`` as a Ray job; the driver runs inside the
  cluster (``ray.init('auto')``) and its logs are tailed back into Dagster.
- otherwise: Dagster's ``PipesSubprocessClient`` runs the same command here; the driver joins ``ray_address``
  (or starts a private local cluster when that is None).

Both run in the tests: ``tests/ray/test_ray_backend.py`` the subprocess launcher on a local cluster,
``tests/ray/test_job_submission.py`` job submission to a local head with its job server (``ray[default]``).
Progress lines (done / total, time left) go through Pipes into the run log (``idistill_assets.progress``).
The workers read the tokenized pool rows themselves, by window, from a Lance table the driver writes once to
``backend.pool_uri`` (default here: the LanceDB folder), so token ids never travel through Ray's object store.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

STEPS = ("embeddings", "landmarks")


def run_on_backend(context, res, step: str, **extras) -> dict:
    """On the ``ray`` backend: run ``step``'s driver through Pipes and return its final metadata; else ``{}``."""
    backend = res.settings.backend
    if backend is None or backend.name == "local":
        return {}
    extras = {"step": step, "profile": res.profile, "home": res.home, **extras}
    if backend.ray_job_address:
        from dagster_ray import PipesRayJobClient

        client = PipesRayJobClient(address=backend.ray_job_address)
        invocation = client.run(
            context=context,
            submit_job_params={"entrypoint": f"{sys.executable} -m idistill_assets.ray_job"},
            extras={**extras, "ray_address": "auto"},
        )
    else:
        import os

        import dagster as dg

        client = dg.PipesSubprocessClient(env=dict(os.environ))
        invocation = client.run(
            command=[sys.executable, "-m", "idistill_assets.ray_job"], context=context, extras=extras
        )
    messages = invocation.get_custom_messages()
    if not messages:
        raise RuntimeError(f"the Ray driver of '{step}' ended without reporting its result.")
    return messages[-1]


class _PipesLogHandler(logging.Handler):
    """Forwards the core's log lines (commits, Ray plan) to the Dagster run, as structured Pipes log events."""

    def __init__(self, pipes):
        super().__init__(logging.INFO)
        self.pipes = pipes

    def emit(self, record: logging.LogRecord) -> None:
        self.pipes.log.info(record.getMessage())


def _embeddings(pipes, res, backend) -> dict:
    from idistill_assets.progress import eta_logger
    from idistill_assets.upstream import tokenized_pool
    from idistill_core.backends import ModelSource
    from idistill_core.pipeline.embeddings import embed_pool

    s = res.settings
    loaded = res.load_model(attn_implementation="eager")
    tokenized = tokenized_pool(res, loaded.tokenizer)
    store = res.store()

    on_commit = eta_logger(pipes.log, "embeddings on Ray: committed", "new samples")

    report = embed_pool(
        loaded.model,
        loaded.tokenizer,
        tokenized.examples,
        store,
        res.recipe().embed,  # auto precision resolved, as the store's identity was
        commit_every=s.commit_every,
        on_commit=on_commit,
        backend=backend,
        source=ModelSource.of(loaded, s.cache_dir),
    )
    return {
        "inserted": report.inserted,
        "computed_on_ray": report.computed,
        "seconds": round(report.seconds, 2),
        "samples_per_second": round(report.computed / report.seconds, 2) if report.computed else 0.0,
    }


def _landmarks(pipes, res, backend, ids: list[str], shard_dir: str) -> dict:
    from idistill_assets.progress import eta_logger
    from idistill_assets.upstream import gradient_model, tokenized_pool, warmup_dir
    from idistill_core.backends import ModelSource
    from idistill_core.models.loading import load_model
    from idistill_core.pipeline.gradients import compute_gradients_resumable
    from idistill_core.store import artifacts

    s = res.settings
    model, tokenizer, pre = gradient_model(res)
    # the workers load the same weights the asset uses: the warmed checkpoint when warm-up is on
    if artifacts.read_json(warmup_dir(res) / "state.json").get("enabled"):
        source = ModelSource.of(load_model(str(warmup_dir(res) / "model")), s.cache_dir)
    else:
        source = ModelSource.of(res.load_model(), s.cache_dir)
    tokenized = tokenized_pool(res, tokenizer)
    start = time.perf_counter()

    on_chunk = eta_logger(pipes.log, "landmark gradients on Ray: wrote shard", "")

    compute_gradients_resumable(
        model,
        tokenizer,
        tokenized.examples,
        ids,
        res.recipe().gradients,
        shard_dir,
        preconditioner=pre,
        chunk_size=s.commit_every,
        on_chunk=on_chunk,
        backend=backend,
        source=source,
    )
    return {"seconds": round(time.perf_counter() - start, 2)}


def main() -> int:
    from dagster_pipes import open_dagster_pipes

    from idistill_assets.resources import IdistillResource

    with open_dagster_pipes() as pipes:
        step = pipes.get_extra("step")
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; expected one of {STEPS}")
        res = IdistillResource(profile=pipes.get_extra("profile"), home=pipes.get_extra("home"))
        backend = res.settings.backend
        address = pipes.extras.get("ray_address")
        if address:
            backend = dataclasses.replace(backend, ray_address=address)
        if backend.pool_uri is None:
            # the workers read their pool windows from the LanceDB folder (shared storage or an object store on a
            # cluster), not from token ids shipped through Ray's object store
            backend = dataclasses.replace(backend, pool_uri=str(res.settings.lancedb_uri))
        handler = _PipesLogHandler(pipes)
        logging.getLogger("idistill").addHandler(handler)
        logging.getLogger("idistill").setLevel(logging.INFO)
        if step == "embeddings":
            result = _embeddings(pipes, res, backend)
        else:
            result = _landmarks(pipes, res, backend, pipes.get_extra("ids"), pipes.get_extra("shard_dir"))
        result.update(
            backend="ray", ray_address=backend.ray_address or "local cluster", ray_actors=backend.num_actors
        )
        pipes.report_custom_message(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
