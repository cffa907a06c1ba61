"""A tiny project (tiny random Llama, small built-in pool, two targets) in a temp folder, and a Dagster
instance for it. The whole graph materializes in well under a minute."""

import textwrap
from pathlib import Path

import dagster as dg
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

TARGETS = {
    "arith": {"metric": "em-number", "budget": 12},
    "reading": {"metric": "squad", "budget": 10},
}


def write_target(targets_dir: Path, name: str, **overrides) -> Path:
    spec = {
        "name": name,
        "metric": TARGETS.get(name, {}).get("metric", "nll"),
        "dev": f"builtin/targets/{name}/dev.jsonl",
        "test": f"builtin/targets/{name}/test.jsonl",
        "budget": TARGETS.get(name, {}).get("budget", 10),
        "method": "id",
    }
    spec.update(overrides)
    path = targets_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_profile(tmp_path: Path, pool_size: int = 96, **recipe_overrides) -> Path:
    base = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    base["home"] = str(tmp_path / "home")
    base["targets_dir"] = str(tmp_path / "targets")
    base["pool"]["builtin_size"] = pool_size
    base["recipe"].update(recipe_overrides)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path):
    """(profile path, targets dir) of a fresh tiny project with the 'arith' target registered."""
    targets_dir = tmp_path / "targets"
    targets_dir.mkdir()
    write_target(targets_dir, "arith")
    return write_profile(tmp_path), targets_dir


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def dagster_yaml(home: Path) -> Path:
    """A dagster.yaml whose runs launch immediately (no daemon needed)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            telemetry:
              enabled: false
            run_coordinator:
              module: dagster._core.run_coordinator
              class: DefaultRunCoordinator
            """
        )
    )
    return path
