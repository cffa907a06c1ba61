"""Issue 25, Dagster side — a bad target or mix YAML (a field of the wrong type or out of range, or bytes that
are not YAML at all) never crashes the registry sensors: the tick still syncs every valid file, gives the bad
one no partition, and reports the `registry_valid` check of `target_spec` / `mix_spec` failed with the file's
one-line ConfigError (the line `load_target_spec` / `load_mix_spec` raises); fixing the file passes the check
again. The sensors are evaluated tick by tick, as in tests/assets/test_automation.py, with the real sensor
functions and resource.
"""

import tempfile
from pathlib import Path

import dagster as dg
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from idistill_assets.definitions import build_definitions
from idistill_core.errors import ConfigError
from idistill_core.project.mixes import load_mix_spec
from idistill_core.project.targets import load_target_spec
from tests.assets.conftest import write_profile, write_target

from .test_bad_yaml_fields import MIX_BAD, TARGET_BAD
from .test_corrupt_files import corruption

FAST = settings(
    max_examples=5, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CHECK = "registry_valid"


class Registry:
    """A tiny project with valid targets `arith` and `reading`, its definitions and an instance; `tick` runs a
    registry sensor once and applies its result to the instance as the daemon does."""

    def __init__(self, root: Path, instance):
        self.instance, self.cursors = instance, {}
        self.targets_dir = root / "targets"
        (self.targets_dir / "mixes").mkdir(parents=True)
        for name in ("arith", "reading"):
            folder = root / "home" / "data" / "builtin" / "targets" / name
            folder.mkdir(parents=True)
            for split in ("dev", "test"):
                (folder / f"{split}.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
            write_target(self.targets_dir, name)
        self.defs = build_definitions(str(write_profile(root)))

    def tick(self, sensor: str):
        definition = self.defs.resolve_sensor_def(sensor)
        context = dg.build_sensor_context(
            instance=self.instance, cursor=self.cursors.get(sensor), resources={"idistill": self.defs.resources["idistill"]}
        )
        result = definition(context)  # must not raise, whatever the files hold
        if isinstance(result, dg.SkipReason):
            return result
        for request in result.dynamic_partitions_requests:
            if isinstance(request, dg.AddDynamicPartitionsRequest):
                self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
            else:
                for key in request.partition_keys:
                    self.instance.delete_dynamic_partition(request.partitions_def_name, key)
        for event in result.asset_events:
            self.instance.report_runless_asset_event(event)
        self.cursors[sensor] = result.cursor
        return result

    def check(self, spec_key: str):
        key = dg.AssetCheckKey(dg.AssetKey(["idistill", spec_key]), CHECK)
        record = self.instance.event_log_storage.get_latest_asset_check_execution_by_key([key]).get(key)
        return None if record is None else record.event.dagster_event.event_specific_data


@pytest.fixture
def registry():
    with tempfile.TemporaryDirectory() as root, dg.instance_for_test() as instance:
        yield Registry(Path(root), instance)


def _expected_line(load, path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path)
    return str(caught.value)


def _assert_failed_check_then_fixed(registry: Registry, sensor: str, spec_key: str, partitions: str,
                                    bad: Path, expected: str, valid: set[str]):
    result = registry.tick(sensor)
    assert not isinstance(result, dg.SkipReason), result
    assert set(registry.instance.get_dynamic_partitions(partitions)) == valid  # the valid files still synced
    evaluation = registry.check(spec_key)
    assert evaluation is not None and not evaluation.passed
    assert evaluation.description == expected and "\n" not in expected and str(bad) in expected
    skip = registry.tick(sensor)  # nothing changed: a skip that still names the bad file, no new evaluation
    assert isinstance(skip, dg.SkipReason) and str(bad) in skip.skip_message
    bad.unlink()
    registry.tick(sensor)
    assert registry.check(spec_key).passed


@FAST
@given(field=st.sampled_from(sorted(TARGET_BAD)), data=st.data())
def test_a_bad_target_field_fails_the_registry_check_with_its_line_not_the_sensor(registry, field, data):
    bad = write_target(registry.targets_dir, "broken")
    raw = yaml.safe_load(bad.read_text())
    raw[field] = data.draw(TARGET_BAD[field].filter(lambda v: field != "name" or v != "broken"))
    bad.write_text(yaml.safe_dump(raw, sort_keys=False))
    roots = [registry.targets_dir.parent / "home" / "data"]
    expected = _expected_line(lambda p: load_target_spec(p, roots), bad)
    _assert_failed_check_then_fixed(registry, "target_registry_sensor", "target_spec", "targets", bad, expected,
                                    {"arith", "reading"})


@FAST
@given(damage=corruption())
def test_a_corrupted_target_file_never_crashes_the_registry_sensor(registry, damage):
    path = write_target(registry.targets_dir, "broken")
    path.write_bytes(damage(path.read_bytes()))
    roots = [registry.targets_dir.parent / "home" / "data"]
    try:
        load_target_spec(path, roots)
    except ConfigError as error:
        _assert_failed_check_then_fixed(registry, "target_registry_sensor", "target_spec", "targets", path,
                                        str(error), {"arith", "reading"})
        return
    registry.tick("target_registry_sensor")  # still a valid spec (e.g. a dropped trailing newline)
    assert registry.check("target_spec") is None or registry.check("target_spec").passed
    path.unlink()
    registry.tick("target_registry_sensor")


def test_an_edit_that_breaks_a_registered_target_keeps_its_partition(registry):
    registry.tick("target_registry_sensor")
    path = registry.targets_dir / "reading.yaml"
    path.write_text(path.read_text().replace("budget: 10", "budget: -3"))
    result = registry.tick("target_registry_sensor")
    assert set(registry.instance.get_dynamic_partitions("targets")) == {"arith", "reading"}
    assert result.dynamic_partitions_requests == []
    assert "field 'budget' must be a positive integer; got -3" in registry.check("target_spec").description


@FAST
@given(field=st.sampled_from(sorted(MIX_BAD)), data=st.data())
def test_a_bad_mix_field_fails_the_mix_check_with_its_line_not_the_sensor(registry, field, data):
    good = {"name": "both", "targets": {"arith": 2, "reading": 1}, "budget": 20}
    (registry.targets_dir / "mixes" / "both.yaml").write_text(yaml.safe_dump(good))
    bad = registry.targets_dir / "mixes" / "broken.yaml"
    value = data.draw(MIX_BAD[field].filter(lambda v: field != "name" or v != "broken"))
    bad.write_text(yaml.safe_dump({**good, "name": "broken", field: value}, sort_keys=False))
    expected = _expected_line(lambda p: load_mix_spec(p, {"arith", "reading"}), bad)
    _assert_failed_check_then_fixed(registry, "mix_registry_sensor", "mix_spec", "mixes", bad, expected, {"both"})


def test_a_broken_target_file_does_not_stop_the_mix_sensor(registry):
    (registry.targets_dir / "mixes" / "both.yaml").write_text("name: both\ntargets: {arith: 1}\nbudget: 5\n")
    (registry.targets_dir / "reading.yaml").write_text("name: reading\nmetric: [\n")
    result = registry.tick("mix_registry_sensor")
    assert not isinstance(result, dg.SkipReason)
    assert set(registry.instance.get_dynamic_partitions("mixes")) == {"both"}
    assert registry.check("mix_spec") is None  # no invalid mix file: nothing to report


def test_a_broken_profile_is_a_skip_with_its_line(tmp_path, instance):
    profile = tmp_path / "profile.yaml"
    profile.write_text("recipe: {seed: [\n")
    defs = build_definitions(str(profile))
    for sensor in ("target_registry_sensor", "mix_registry_sensor"):
        context = dg.build_sensor_context(instance=instance, resources={"idistill": defs.resources["idistill"]})
        skip = defs.resolve_sensor_def(sensor)(context)
        assert isinstance(skip, dg.SkipReason) and "profile.yaml: invalid YAML at line 2" in skip.skip_message


def test_the_registry_check_runs_on_its_own_with_the_same_line(registry):
    from idistill_assets.defs.targets import target_registry_valid, target_spec

    bad = registry.targets_dir / "broken.yaml"
    bad.write_text("name: broken\nmetric: bleu\n")
    expected = _expected_line(lambda p: load_target_spec(p, []), bad)
    result = dg.materialize(
        [target_spec, target_registry_valid], instance=registry.instance,
        resources={"idistill": registry.defs.resources["idistill"]},
        selection=dg.AssetSelection.checks(target_registry_valid),
    )
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed and evaluation.description == expected
