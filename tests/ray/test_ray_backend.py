"""The ray backend on a real local Ray cluster (2 CPUs, started by ``conftest.ray_cluster``): same results as the
local backend through the Dagster assets, and the failure semantics the README promises (an actor killed mid-job,
the whole job killed and re-run, two jobs on one table)."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import numpy as np
import yaml

from tests.ray.driver import COMMIT_EVERY, EMBED, open_table, ray_backend, tiny_pool

REPO = Path(__file__).resolve().parents[2]
F16 = float(np.finfo(np.float16).eps)


def assert_same_vectors(got: dict, want: dict) -> None:
    """Same ids, and vectors equal up to float16 rounding (the store's dtype) of float32 results that may differ in
    the last bits with the worker's thread count."""
    assert sorted(got) == sorted(want)
    for sample_id, vector in want.items():
        scale = float(np.abs(vector).max())
        np.testing.assert_allclose(
            got[sample_id], vector, rtol=2 * F16, atol=2 * F16 * scale, err_msg=sample_id
        )


def table_vectors(store) -> dict:
    ids = store.sample_ids()
    assert len(ids) == len(set(ids)), f"duplicate ids: {[s for s, n in Counter(ids).items() if n > 1][:5]}"
    return dict(zip(ids, store.read(ids)))


def driver(pool_dir, store, address, actors=1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.ray.driver", str(pool_dir), str(store), address, str(actors)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


# ---------------------------------------------------------------------------------------------------------
# (a) the Dagster assets on both backends
# ---------------------------------------------------------------------------------------------------------
def _profile(tmp_path: Path, name: str, backend: dict | None) -> Path:
    profile = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    profile["home"] = str(tmp_path / name)
    profile["commit_every"] = 16
    if backend is not None:
        profile["backend"] = backend
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def _materialize(profile: Path):
    from idistill_assets.defs import shared
    from idistill_assets.resources import IdistillResource

    resource = IdistillResource(profile=str(profile))
    result = dg.materialize(
        [shared.pool, shared.base_model, shared.embeddings, shared.warmup, shared.landmarks],
        resources={"idistill": resource},
    )
    assert result.success
    events = {tuple(e.asset_key.path): e.materialization for e in result.get_asset_materialization_events()}
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    return resource, events, checks


def test_dagster_assets_on_ray_give_the_local_backends_vectors_ids_gradients_and_data_versions(
    ray_cluster, tmp_path
):
    from idistill_assets.upstream import load_landmarks

    backend = {"name": "ray", "ray_address": ray_cluster, "num_actors": 2, "samples_per_task": 16}
    local, local_events, local_checks = _materialize(_profile(tmp_path, "local", None))
    remote, ray_events, ray_checks = _materialize(_profile(tmp_path, "ray", backend))

    assert set(ray_events) == set(local_events) and ray_checks == local_checks == {"embeddings_valid": True}
    for key in local_events:
        assert (
            ray_events[key].tags["dagster/data_version"] == local_events[key].tags["dagster/data_version"]
        ), key
    embeddings = ray_events[("idistill", "embeddings")].metadata
    pool_size = local_events[("idistill", "embeddings")].metadata["dagster/row_count"].value
    # the Ray driver (Dagster Pipes) computed every sample; the local body after it found nothing missing
    assert embeddings["backend"].value == "ray" and embeddings["computed_on_ray"].value == pool_size
    assert embeddings["inserted"].value == pool_size
    assert ray_events[("idistill", "landmarks")].metadata["backend"].value == "ray"
    assert_same_vectors(table_vectors(remote.store()), table_vectors(local.store()))

    lm_ids, lm, ho_ids, ho = load_landmarks(local)
    got_ids, got_lm, got_ho_ids, got_ho = load_landmarks(remote)
    assert (got_ids, got_ho_ids) == (lm_ids, ho_ids)
    # unit-norm rows projected to P dims: float32 rounding of a few hundred terms, far below any real difference
    tolerance = 1e4 * float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(np.concatenate([got_lm, got_ho]), np.concatenate([lm, ho]), atol=tolerance)


# ---------------------------------------------------------------------------------------------------------
# (b) an actor killed mid-job
# ---------------------------------------------------------------------------------------------------------
def _worker_actors():
    from ray._private import state

    return [a for a in state.actors().values() if "MapWorker" in a["ActorClassName"]]


def test_an_actor_killed_mid_job_is_restarted_and_every_id_ends_in_the_table_exactly_once(
    ray_cluster, pool_dir, reference, tmp_path
):
    from idistill_core.backends import ModelSource
    from idistill_core.pipeline.embeddings import embed_pool

    loaded, examples = tiny_pool(pool_dir)
    store = open_table(tmp_path / "store", loaded)
    killed: list[int] = []

    def kill_one_actor(done: int, total: int) -> None:
        if killed:
            return
        alive = [a for a in _worker_actors() if a["State"] == "ALIVE" and a["Pid"]]
        assert alive, "no live worker actor to kill"
        os.kill(alive[0]["Pid"], signal.SIGKILL)
        killed.append(alive[0]["ActorID"])
        assert done < total, "the job had finished before the kill"

    report = embed_pool(
        loaded.model,
        loaded.tokenizer,
        examples,
        store,
        EMBED,
        commit_every=COMMIT_EVERY,
        on_commit=kill_one_actor,
        backend=ray_backend(None, 2),
        source=ModelSource.of(loaded),
    )
    assert killed
    restarts = {a["ActorID"]: a["NumRestarts"] for a in _worker_actors()}
    assert restarts[killed[0]] >= 1, "Ray did not restart the killed actor"
    assert report.computed == len(examples) and report.inserted == len(examples)
    assert_same_vectors(table_vectors(store), reference)


# ---------------------------------------------------------------------------------------------------------
# (c) the whole job killed, then re-run
# ---------------------------------------------------------------------------------------------------------
def test_a_killed_job_rerun_computes_only_the_ids_missing_after_its_last_commit(
    ray_cluster, pool_dir, reference, tmp_path
):
    from idistill_core.backends import ModelSource
    from idistill_core.pipeline.embeddings import embed_pool

    job = driver(pool_dir, tmp_path / "store", ray_cluster)
    commits = 0
    for line in job.stdout:
        commits += line.startswith("commit ")
        if commits == 2:
            job.send_signal(signal.SIGKILL)
            break
    job.wait(timeout=60)
    assert commits == 2 and job.returncode == -signal.SIGKILL

    loaded, examples = tiny_pool(pool_dir)
    store = open_table(tmp_path / "store", loaded)
    kept = store.count()
    assert 2 * COMMIT_EVERY <= kept < len(examples)
    report = embed_pool(
        loaded.model,
        loaded.tokenizer,
        examples,
        store,
        EMBED,
        commit_every=COMMIT_EVERY,
        backend=ray_backend(None, 2),
        source=ModelSource.of(loaded),
    )
    assert report.already_present == kept and report.computed == len(examples) - kept
    assert_same_vectors(table_vectors(store), reference)


# ---------------------------------------------------------------------------------------------------------
# (d) two jobs on one table
# ---------------------------------------------------------------------------------------------------------
def test_two_concurrent_jobs_on_one_table_neither_duplicate_nor_lose_an_id(
    ray_cluster, pool_dir, reference, tmp_path
):
    loaded, _ = tiny_pool(pool_dir)
    open_table(tmp_path / "store", loaded)  # created once, so both jobs race on inserts, not on the create
    jobs = [driver(pool_dir, tmp_path / "store", ray_cluster) for _ in range(2)]
    outputs = []
    deadline = time.monotonic() + 300
    for job in jobs:
        out, _ = job.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert job.returncode == 0, out
        outputs.append(out)
    computed = [int(out.split("done ")[1].split()[0]) for out in outputs]
    assert sum(computed) >= len(reference)
    assert_same_vectors(table_vectors(open_table(tmp_path / "store", loaded)), reference)
