"""The UI's own path: a real dagster-webserver on a free localhost port launches a run through GraphQL."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO, dagster_yaml, write_profile

pytestmark = pytest.mark.smoke

REPOSITORIES = """{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"""
LAUNCH = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
STATUS = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = json.loads(response.read())
    assert "errors" not in payload, payload
    return payload["data"]


def _wait_until_up(port: int, process: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        assert process.poll() is None, "dagster-webserver exited early"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError("dagster-webserver did not come up in time")


def test_webserver_launches_a_materialization_through_graphql(tmp_path):
    (tmp_path / "targets").mkdir()
    profile = write_profile(tmp_path)
    home = tmp_path / "dagster_home"
    dagster_yaml(home)
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "IDISTILL_PROFILE": str(profile), "OMP_NUM_THREADS": "1"}
    webserver = Path(sys.executable).with_name("dagster-webserver")
    with open(tmp_path / "webserver.log", "w") as log:
        process = subprocess.Popen(
            [str(webserver), "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            _wait_until_up(port, process, time.monotonic() + 300)
            nodes = _graphql(port, REPOSITORIES)["repositoriesOrError"]["nodes"]
            assert nodes, "no repository loaded"
            repo = nodes[0]
            params = {
                "selector": {
                    "repositoryLocationName": repo["location"]["name"],
                    "repositoryName": repo["name"],
                    "jobName": "shared_job",
                },
                "runConfigData": {},
            }
            launched = _graphql(port, LAUNCH, {"params": params})["launchRun"]
            assert launched["__typename"] == "LaunchRunSuccess", launched
            run_id = launched["run"]["runId"]
            status, deadline = None, time.monotonic() + 400
            while time.monotonic() < deadline:
                status = _graphql(port, STATUS, {"id": run_id})["runOrError"]["status"]
                if status in ("SUCCESS", "FAILURE", "CANCELED"):
                    break
                time.sleep(2)
            assert status == "SUCCESS", (status, (tmp_path / "webserver.log").read_text()[-3000:])
            assert (tmp_path / "home" / "lancedb").exists()  # the run really embedded the pool
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
