"""The cluster path for real: a local Ray head with its job server (``ray[default]``: dashboard and job
submission) on 127.0.0.1, started and stopped by this test, and the ``embeddings`` and ``landmarks`` assets run
through dagster-ray's ``PipesRayJobClient`` (profile ``backend.ray_job_address``): the Ray driver
(``idistill_assets.ray_job``) is submitted as a Ray job, its Pipes messages come back from the job's logs, and
the data versions equal a local run's.

The head runs with token authentication (Ray's default for a cluster with a dashboard), a random token passed to
the head and to this process only, and explicit free ports, so it neither meets nor accepts other Ray clusters
on the machine. ``ray start --block`` in its own process group: stopping that group stops every process it
started (never ``ray stop``, which would stop every Ray cluster of the user)."""

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.ray.test_ray_backend import _materialize, _profile

pytestmark = pytest.mark.slow
PORTS = (
    "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
    "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port",
)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM to the head's process group (``ray start --block`` then stops what it started), SIGKILL after."""
    for sig, wait in ((signal.SIGTERM, 40), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=wait)
            time.sleep(2)  # the group's other members exit just after the leader
            os.killpg(head.pid, 0)  # still a member alive: escalate
        except (subprocess.TimeoutExpired, ProcessLookupError, PermissionError):
            pass
        else:
            continue
    return


@contextlib.contextmanager
def _client_token(token: str):
    """This process's Ray clients send ``token``: Ray caches the auth mode (RayConfig) and the token (its C++
    loader) on first use, so both are refreshed on the way in and out, as ``ray.init`` itself does."""
    from ray._raylet import AuthenticationTokenLoader, Config

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture
def ray_head():
    """The dashboard (job server) address of a fresh local Ray head; this process's Ray clients hold its token
    meanwhile. Stopped at the end."""
    pytest.importorskip("aiohttp_cors", reason="the job server needs ray[default]")
    ports = dict(zip(PORTS, _free_ports(len(PORTS)), strict=True))
    token = secrets.token_hex(16)
    temp = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--num-cpus", "2",
        "--object-store-memory", str(300 * 1024**2), "--temp-dir", str(temp), "--disable-usage-stats",
        *[arg for name, port in ports.items() for arg in (f"--{name}", str(port))],
    ]
    log = open(temp / "head.log", "w")  # noqa: SIM115 - closed in the finally below
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        with _client_token(token):
            from ray.job_submission import JobSubmissionClient

            deadline, error = time.monotonic() + 180, None
            while time.monotonic() < deadline:
                if head.poll() is not None:
                    pytest.fail(f"ray start exited with {head.returncode}:\n{(temp / 'head.log').read_text()[-3000:]}")
                try:
                    JobSubmissionClient(address).list_jobs()
                    break
                except Exception as err:  # noqa: BLE001 - not up yet (connection refused, 5xx)
                    error = err
                    time.sleep(1)
            else:
                pytest.fail(f"the job server at {address} did not answer in 180 s ({error})")
            yield address
    finally:
        _stop(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_embeddings_and_landmarks_run_as_ray_jobs_through_pipes_with_the_local_data_versions(ray_head, tmp_path):
    started = time.monotonic()
    backend = {"name": "ray", "ray_job_address": ray_head, "num_actors": 1, "samples_per_task": 32}
    _, local_events, local_checks = _materialize(_profile(tmp_path, "local", None))
    _, job_events, job_checks = _materialize(_profile(tmp_path, "job", backend))

    assert set(job_events) == set(local_events) and job_checks == local_checks == {"embeddings_valid": True}
    for key in local_events:
        assert job_events[key].tags["dagster/data_version"] == local_events[key].tags["dagster/data_version"], key
    embeddings = job_events[("idistill", "embeddings")].metadata
    pool_size = local_events[("idistill", "embeddings")].metadata["dagster/row_count"].value
    # the submitted driver computed every sample on the cluster and reported it back through the job's logs
    assert embeddings["backend"].value == "ray" and embeddings["computed_on_ray"].value == pool_size
    assert embeddings["ray_address"].value == "auto"
    assert job_events[("idistill", "landmarks")].metadata["backend"].value == "ray"

    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(ray_head).list_jobs()
    assert len(jobs) == 2 and all(j.status == JobStatus.SUCCEEDED for j in jobs), jobs
    assert all("idistill_assets.ray_job" in j.entrypoint for j in jobs)
    assert time.monotonic() - started < 240
