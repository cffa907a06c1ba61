"""A user's path in a real browser: Debian's Chromium, driven by Selenium, against a real dagster-webserver on
the tiny profile and the instance `make ui` prepares (``python -m idistill_assets.instance``). The asset graph is
the first page and no "Join the Dagster community" dialog covers it; the target's chain is launched from the UI's
own "Materialize all" button, the target's dev file is edited, and the page must then report the partition stale.
Screenshots are kept in the test's tmp dir."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from idistill_assets.definitions import build_definitions
from idistill_assets.defs.automation import registry_tick
from idistill_core.project.settings import load_settings
from idistill_core.project.targets import load_registry

from .conftest import REPO, write_profile, write_target
from .test_webserver import _free_port, _graphql, _wait_until_up

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
    "apt-get install chromium chromium-driver",
)
TARGET = "arith"
COMMUNITY_DIALOG = "Join the Dagster community"
RUNS = """{ runsOrError { ... on Runs { results { runId jobName status tags { key value } } } } }"""


def sync_registry(profile: Path, instance: dg.DagsterInstance, cursor: str | None) -> str | None:
    """One tick of the registry sensor applied to the instance, as the daemon would (test_automation.py)."""
    settings = load_settings(profile)
    current = {n: s.version() for n, s in load_registry(settings.targets_dir, settings.data_roots).items()}
    result = registry_tick(current, set(instance.get_dynamic_partitions("targets")), cursor)
    if isinstance(result, dg.SkipReason):
        return cursor
    for request in result.dynamic_partitions_requests:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions("targets", list(request.partition_keys))
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return result.cursor


class Page:
    """The browser, with a screenshot after every step under ``shots``."""

    def __init__(self, shots: Path, profile_dir: Path):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile_dir}",
            "--window-size=1600,1000",
        ):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        self.shots, self.count = shots, 0
        shots.mkdir(parents=True, exist_ok=True)

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.shots / f"{self.count:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def text(self) -> str:
        return self.driver.find_element("tag name", "body").text

    def wait_for_text(self, needle: str, timeout: float, reload_every: float | None = None) -> bool:
        deadline, last_reload = time.monotonic() + timeout, time.monotonic()
        while time.monotonic() < deadline:
            if needle in self.text():
                return True
            if reload_every and time.monotonic() - last_reload > reload_every:
                self.driver.refresh()
                last_reload = time.monotonic()
            time.sleep(0.5)
        return False

    def button(self, label: str, timeout: float = 30):
        """The first visible, enabled button whose text starts with ``label`` (None when it never appears)."""
        from selenium.common.exceptions import StaleElementReferenceException

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for element in self.driver.find_elements("xpath", "//button"):
                try:
                    if (
                        element.is_displayed()
                        and element.is_enabled()
                        and element.text.strip().startswith(label)
                    ):
                        return element
                except StaleElementReferenceException:  # re-rendered under us: look again
                    continue
            time.sleep(0.5)
        return None


def _stop(process: subprocess.Popen) -> None:
    """Ends the webserver and whatever it started (its process group)."""
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def test_materialize_button_runs_the_target_chain_and_a_dev_edit_shows_the_partition_unsynced(tmp_path, monkeypatch):
    from idistill_assets import instance as make_ui_instance

    started = time.monotonic()
    targets_dir = tmp_path / "targets"
    targets_dir.mkdir()
    write_target(targets_dir, TARGET)
    profile = write_profile(tmp_path)
    # the instance `make ui` writes (telemetry and the onboarding dialog off, the run queue, the pools)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # restored after the test: the step below sets it
    assert make_ui_instance.main(["--profile", str(profile)]) == 0
    home = load_settings(profile).home / "dagster_home"
    assert "nux:\n  enabled: false" in (home / "dagster.yaml").read_text()

    # The shared assets first, in-process on the same instance the webserver will read.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        defs = build_definitions(str(profile))
        assert defs.resolve_job_def("shared_job").execute_in_process(instance=instance).success
        cursor = sync_registry(profile, instance, None)
        assert TARGET in instance.get_dynamic_partitions("targets")

    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "IDISTILL_PROFILE": str(profile), "OMP_NUM_THREADS": "1"}
    webserver = Path(sys.executable).with_name("dagster-webserver")
    log_path = tmp_path / "webserver.log"
    page = None
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(webserver), "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        daemon = subprocess.Popen(
            [str(webserver.with_name("dagster-daemon")), "run", "-w", str(REPO / "workspace.yaml")],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_until_up(port, process, time.monotonic() + 300)  # slow start on 2 busy cores
            # the webserver answers before its code location has loaded (slowly, on 2 busy cores): wait for it
            deadline, nodes = time.monotonic() + 300, []
            while not nodes and time.monotonic() < deadline:
                nodes = _graphql(
                    port,
                    "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }",
                )["repositoriesOrError"].get("nodes") or []
                if not nodes:
                    time.sleep(2)
            assert nodes, "the code location did not load in time (see webserver.log)"
            location = nodes[0]
            base = f"http://127.0.0.1:{port}"
            page = Page(tmp_path / "screenshots", tmp_path / "chromium-profile")
            # a new user's first page: the asset graph, with no community dialog over it
            page.driver.get(f"{base}/asset-groups")
            graph = page.wait_for_text("Global asset lineage", timeout=60)
            time.sleep(3)  # the dialog would open once its query answers, after the graph has drawn
            page.shot("asset-graph")
            assert graph and "shared" in page.text(), f"the asset graph did not show:\n{page.text()[:2000]}"
            assert COMMUNITY_DIALOG not in page.text(), "the community dialog covers the asset graph"
            page.driver.get(f"{base}/locations/{location['location']['name']}/jobs/target_job")
            button = page.button("Materialize", timeout=45)
            page.shot("target-job")
            assert button is not None, f"no Materialize button on the target_job page:\n{page.text()[:2000]}"
            page.driver.execute_script("arguments[0].click()", button)
            assert COMMUNITY_DIALOG not in page.text(), "the community dialog opened over the launch dialog"
            # every upstream is materialized (rds_features as an empty marker, no target uses rds): the UI must not
            # ask to confirm launching over an unmaterialized upstream
            confirm = page.button("Confirm", timeout=5)
            if confirm is not None:
                page.shot("confirm-prompt")
            assert confirm is None, f"the UI asked to confirm an unmaterialized upstream:\n{page.text()[-2000:]}"
            everything = page.button("All", timeout=60)  # the dialog opens on "Custom" with 0 partitions
            if everything is None:
                page.shot("no-partition-selection")
            assert everything is not None, f"no partition selection in the dialog:\n{page.text()[-3000:]}"
            page.driver.execute_script("arguments[0].click()", everything)
            time.sleep(1)
            launch = page.button("Launch", timeout=30)
            page.shot("partition-dialog")
            assert launch is not None, f"no Launch button in the partition dialog:\n{page.text()[:2000]}"
            page.driver.execute_script("arguments[0].click()", launch)

            run, deadline = None, time.monotonic() + 150
            while time.monotonic() < deadline:
                runs = _graphql(port, RUNS)["runsOrError"]["results"]
                mine = [r for r in runs if r["jobName"] == "target_job"]
                run = mine[0] if mine else None
                if run and run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
                    break
                time.sleep(2)
            page.shot("after-run")
            assert run is not None, "the Materialize button launched no target_job run"
            tags = {t["key"]: t["value"] for t in run["tags"]}
            assert tags.get("dagster/partition") == TARGET, tags
            assert run["status"] == "SUCCESS", (run, log_path.read_text()[-3000:])

            dev_file = load_settings(profile).data_root / "builtin" / "targets" / TARGET / "dev.jsonl"
            assert dev_file.exists(), dev_file
            dev_file.write_text(
                dev_file.read_text()
                + json.dumps(
                    {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
                )
                + "\n"
            )
            with dg.DagsterInstance.from_config(str(home)) as instance:
                assert sync_registry(profile, instance, cursor) != cursor, (
                    "the dev edit made no new spec version"
                )

            page.driver.get(f"{base}/assets/idistill/target_gradients?view=partitions&partition={TARGET}")
            stale = page.wait_for_text("Unsynced", timeout=40, reload_every=8)
            final = page.shot("partition-unsynced")
            assert stale, f"no 'Unsynced' marker for partition {TARGET}:\n{page.text()[:3000]}"
            if os.environ.get("IDISTILL_SAVE_SCREENSHOTS") == "1":
                shutil.copy(final, REPO / "docs" / "img" / "add-a-target.png")
        finally:
            if page is not None:
                page.driver.quit()
            _stop(process)
            _stop(daemon)
    assert time.monotonic() - started < 150
