"""Shared builders for the reliability tests: tiny projects, asset runs that may fail, and their error text.

A tiny project is the tests/assets one (tiny random Llama, built-in pool of 96, `profiles/tiny.yaml` recipe)
with small commit chunks, so a killed run has several committed chunks to keep.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.assets.conftest import write_profile, write_target

REPO = Path(__file__).resolve().parents[2]
COMMIT_EVERY = 8


def tiny_project(
    tmp_path: Path,
    pool_size: int = 96,
    targets=("arith",),
    top: dict | None = None,
    recipe: dict | None = None,
    pool: dict | None = None,
) -> Path:
    """Write targets and a profile under ``tmp_path``; returns the profile path.

    ``top``, ``recipe``, ``pool``: fields that override the tiny profile's top level, recipe and pool sections.
    """
    targets_dir = tmp_path / "targets"
    targets_dir.mkdir(parents=True, exist_ok=True)
    for name in targets:
        write_target(targets_dir, name)
    profile = write_profile(tmp_path, pool_size=pool_size)
    edit_profile(profile, recipe=recipe, pool=pool, commit_every=COMMIT_EVERY, **(top or {}))
    return profile


def edit_profile(profile: Path, recipe: dict | None = None, pool: dict | None = None, **top) -> Path:
    raw = yaml.safe_load(profile.read_text())
    raw.update(top)
    raw["recipe"].update(recipe or {})
    raw["pool"].update(pool or {})
    profile.write_text(yaml.safe_dump(raw, sort_keys=False))
    return profile


def run_assets(profile: Path, instance, names: list[str] | None = None, partition: str | None = None):
    """Materialize ``names`` (all shared assets when None, or the selection job for ``partition``)."""
    from idistill_assets.definitions import build_definitions

    defs = build_definitions(str(profile))
    if partition is not None:
        if partition not in instance.get_dynamic_partitions("targets"):
            instance.add_dynamic_partitions("targets", [partition])
        job = defs.resolve_job_def("selection_job")
        return job.execute_in_process(instance=instance, partition_key=partition, raise_on_error=False)
    selection = [dg.AssetKey(["idistill", n]) for n in names] if names else None
    job = defs.resolve_job_def("shared_job")
    return job.execute_in_process(instance=instance, asset_selection=selection, raise_on_error=False)


def failure_messages(result) -> list[str]:
    """The error text of every failed step (the user's exception, unwrapped from Dagster's wrapper)."""
    messages = []
    for event in result.all_events:
        if not event.is_step_failure:
            continue
        error = event.step_failure_data.error
        while error is not None:
            messages.append(error.message.strip())
            error = error.cause
    return messages


def assert_run_fails_with(result, error_type: str, *fragments: str) -> str:
    """The run failed and one failed step raised ``error_type`` with a one-line message containing ``fragments``."""
    assert not result.success, "the run should have failed"
    lines = [m for m in failure_messages(result) if m.startswith(f"idistill_core.errors.{error_type}:")]
    assert lines, failure_messages(result)
    message = lines[0].split(": ", 1)[1]
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def spawn(args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    """Start ``python -m tests.reliability.jobrunner ARGS`` from the repo root."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.jobrunner", *args],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


GOOD = {
    "sample_id": "a",
    "source": "s",
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def bad_files(folder: Path) -> dict[str, tuple[Path, str, list[str]]]:
    """name -> (file, error class, fragments the one-line message must contain)."""
    folder.mkdir(parents=True, exist_ok=True)
    b = {**GOOD, "sample_id": "b"}
    latin1 = folder / "latin1.jsonl"
    latin1.write_bytes((json.dumps(GOOD) + "\n" + json.dumps({**b, "source": "caf\u00e9"}, ensure_ascii=False) + "\n").encode("latin-1"))
    schema = folder / "schema.parquet"
    pq.write_table(pa.table({"text": ["x"], "label": [1]}), schema)
    cases = {
        "missing_file": (folder / "nope.jsonl", ["nope.jsonl", "file not found"]),
        "malformed_json_line": (
            jsonl(folder / "malformed.jsonl", [GOOD, b, '{"sample_id": "c", "messages": [']),
            ["malformed.jsonl:3", "malformed JSON line"],
        ),
        "wrong_parquet_schema": (schema, ["schema.parquet", "cannot detect the schema", "'messages'"]),
        "empty_file": (jsonl(folder / "empty.jsonl", []), ["empty.jsonl", "empty dataset"]),
        "empty_messages": (
            jsonl(folder / "nomsg.jsonl", [GOOD, {**b, "messages": []}]),
            ["nomsg.jsonl:2", "sample 'b'", "missing or empty 'messages'"],
        ),
        "missing_messages": (
            jsonl(folder / "nomsg2.jsonl", [GOOD, {"sample_id": "b", "source": "s"}]),
            ["nomsg2.jsonl:2", "sample 'b'", "missing or empty 'messages'"],
        ),
        "unknown_role": (
            jsonl(
                folder / "role.jsonl",
                [GOOD, {**b, "messages": [{"role": "robot", "content": "x"}, GOOD["messages"][1]]}],
            ),
            ["role.jsonl:2", "sample 'b'", "unknown role 'robot'"],
        ),
        "no_assistant_turn": (
            jsonl(folder / "noasst.jsonl", [GOOD, {**b, "messages": [{"role": "user", "content": "x"}]}]),
            ["noasst.jsonl:2", "sample 'b'", "no assistant turn"],
        ),
        "duplicate_sample_id": (
            jsonl(folder / "dup.jsonl", [GOOD, dict(GOOD)]),
            ["dup.jsonl", "sample_id 'a' appears twice (lines 1 and 2)"],
        ),
        "not_utf8": (latin1, ["latin1.jsonl:2:", "byte 0xe9", "not valid UTF-8"]),
        "messages_json_string": (
            jsonl(folder / "strmsg.jsonl", [GOOD, {**b, "messages": json.dumps(GOOD["messages"])}]),
            ["strmsg.jsonl:2", "sample 'b'", "field 'messages' is a string", "json.loads"],
        ),
        "empty_assistant_message": (
            jsonl(folder / "emptyasst.jsonl", [GOOD, {**b, "messages": [GOOD["messages"][0], {"role": "assistant", "content": ""}]}]),
            ["emptyasst.jsonl:2", "sample 'b'", "empty assistant message"],
        ),
        "chat_or_tulu": (
            jsonl(folder / "tuluish.jsonl", [{**GOOD, "id": "x", "dataset": "flan"}]),
            ["tuluish.jsonl", "fit both chat", "Tulu V2", "chat", "tulu"],
        ),
    }
    return {name: (path, "DataError", fragments) for name, (path, fragments) in cases.items()}


def store_rows(uri: Path, table: str | None = None) -> int:
    """Rows in every LanceDB table under ``uri`` (or only in ``table``; 0 when there is none)."""
    import lancedb

    if not uri.exists():
        return 0
    db = lancedb.connect(str(uri))
    names = [n for n in db.list_tables().tables if table is None or n == table]
    return sum(db.open_table(name).count_rows() for name in names)
