"""Sensors tick by tick, and the per-partition data version of target_spec."""

import json

import dagster as dg

from idistill_assets.defs.automation import registry_tick, shared_inputs_tick
from idistill_core.targets import load_registry

from .conftest import write_target


def test_first_tick_adds_every_target_and_runs_each_once():
    result = registry_tick({"arith": "v1", "mcq": "v1"}, set(), None)
    assert isinstance(result, dg.SensorResult)
    assert [r.partition_key for r in result.run_requests] == ["arith", "mcq"]
    (add,) = result.dynamic_partitions_requests
    assert list(add.partition_keys) == ["arith", "mcq"]
    assert json.loads(result.cursor) == {"arith": "v1", "mcq": "v1"}


def test_nothing_new_skips():
    cursor = json.dumps({"arith": "v1"})
    assert isinstance(registry_tick({"arith": "v1"}, {"arith"}, cursor), dg.SkipReason)


def test_editing_one_target_runs_only_that_partition_and_reports_its_new_data_version():
    cursor = json.dumps({"arith": "v1", "mcq": "v1"})
    result = registry_tick({"arith": "v2", "mcq": "v1"}, {"arith", "mcq"}, cursor)
    assert [r.partition_key for r in result.run_requests] == ["arith"]
    assert not result.dynamic_partitions_requests
    (observation,) = result.asset_events
    assert observation.partition == "arith" and observation.tags["dagster/data_version"] == "v2"


def test_removed_target_deletes_its_partition_without_runs():
    cursor = json.dumps({"arith": "v1", "mcq": "v1"})
    result = registry_tick({"arith": "v1"}, {"arith", "mcq"}, cursor)
    assert result.run_requests == []
    (delete,) = result.dynamic_partitions_requests
    assert list(delete.partition_keys) == ["mcq"]


def test_shared_inputs_sensor_runs_all_targets_only_when_a_data_version_changes():
    first = shared_inputs_tick({"e": "1", "l": "1"}, ["a", "b"], None)
    assert first.run_requests == []  # first tick records the baseline
    assert isinstance(shared_inputs_tick({"e": "1", "l": "1"}, ["a", "b"], first.cursor), dg.SkipReason)
    changed = shared_inputs_tick({"e": "2", "l": "1"}, ["a", "b"], first.cursor)
    assert [r.partition_key for r in changed.run_requests] == ["a", "b"]


def test_spec_version_changes_only_for_the_edited_target(tmp_path):
    targets_dir, data = tmp_path / "targets", tmp_path / "data"
    targets_dir.mkdir()
    for name in ("arith", "reading"):
        folder = data / "builtin" / "targets" / name
        folder.mkdir(parents=True)
        (folder / "dev.jsonl").write_text("{}\n")
        (folder / "test.jsonl").write_text("{}\n")
        write_target(targets_dir, name)
    before = {k: v.version() for k, v in load_registry(targets_dir, [data]).items()}
    write_target(targets_dir, "arith", budget=99)
    after = {k: v.version() for k, v in load_registry(targets_dir, [data]).items()}
    assert after["arith"] != before["arith"] and after["reading"] == before["reading"]
    (data / "builtin" / "targets" / "reading" / "dev.jsonl").write_text('{"changed": 1}\n')
    again = {k: v.version() for k, v in load_registry(targets_dir, [data]).items()}
    assert again["reading"] != after["reading"] and again["arith"] == after["arith"]
