"""Declarative automation tick by tick on an ephemeral instance (Dagster's own evaluator), the registry
sensor's partition bookkeeping, and the profile-derived code versions.

Materializations are reported to the instance with the data and code versions a real run records, so each tick
sees exactly what the daemon would; the real runs themselves are covered by test_pipeline.py."""

import json

import dagster as dg
import pytest
import yaml

from idistill_assets.definitions import build_definitions
from idistill_assets.defs.automation import code_versions, registry_tick
from idistill_core.project.settings import load_settings
from idistill_core.project.targets import load_registry

from .conftest import write_profile, write_target

# rds_features is a shared asset like the rest (an empty marker when no target uses method rds)
SHARED = ["pool", "base_model", "embeddings", "rds_features", "warmup", "landmarks", "propagation"]
CHAIN = [
    "target_gradients",
    "landmark_influence",
    "propagated_weights",
    "selected_subset",
    "finetuned_checkpoint",
    "random_checkpoint",
    "eval_scores",
]
AFTER_LANDMARKS = CHAIN[1:]


def key(name):
    return dg.AssetKey(["idistill", name])


class Project:
    """A tiny project on disk, its definitions, an instance and the automation cursor between ticks."""

    def __init__(self, tmp_path, instance):
        self.tmp, self.instance, self.cursor = tmp_path, instance, None
        self.targets_dir = tmp_path / "targets"
        self.targets_dir.mkdir()
        self.data = tmp_path / "home" / "data" / "builtin" / "targets"
        self.profile = write_profile(tmp_path)
        self.set_profile(orchestration={"automate_heavy": True})
        self.registry_cursor = None

    def set_profile(self, **sections):
        raw = yaml.safe_load(self.profile.read_text())
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        self.profile.write_text(yaml.safe_dump(raw, sort_keys=False))
        self.defs = build_definitions(str(self.profile))

    def add_target(self, name, **fields):
        folder = self.data / name
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("dev", "test"):
            path = folder / f"{split}.jsonl"
            if not path.exists():
                path.write_text(json.dumps({"messages": [{"role": "user", "content": name}]}) + "\n")
        write_target(self.targets_dir, name, **fields)

    def sync_registry(self):
        """One tick of the registry sensor's decision, applied to the instance like the daemon does."""
        settings = load_settings(self.profile)
        current = {
            n: s.version() for n, s in load_registry(settings.targets_dir, settings.data_roots).items()
        }
        known = set(self.instance.get_dynamic_partitions("targets"))
        result = registry_tick(current, known, self.registry_cursor)
        if isinstance(result, dg.SkipReason):
            return result
        for request in result.dynamic_partitions_requests:
            if isinstance(request, dg.AddDynamicPartitionsRequest):
                self.instance.add_dynamic_partitions("targets", list(request.partition_keys))
            else:
                for partition in request.partition_keys:
                    self.instance.delete_dynamic_partition("targets", partition)
        for event in result.asset_events:
            self.instance.report_runless_asset_event(event)
        self.registry_cursor = result.cursor
        return result

    def tick(self):
        """One evaluation of the automation sensor: {asset name: set of requested partitions}."""
        result = dg.evaluate_automation_conditions(defs=self.defs, instance=self.instance, cursor=self.cursor)
        self.cursor = result.cursor
        graph = self.defs.resolve_asset_graph()
        return {
            k.path[-1]: set(result.get_requested_partitions(k))
            for k in graph.get_all_asset_keys()
            if result.get_num_requested(k)
        }

    def materialize(self, requested, data_version="same"):
        """Record what a run of ``requested`` writes: a materialization with a data version and code version."""
        graph = self.defs.resolve_asset_graph()
        for name in SHARED + CHAIN:
            for partition in sorted(requested.get(name, ()), key=str):
                node = graph.get(key(name))
                version = f"{name}-{partition}-{data_version}"
                self.instance.report_runless_asset_event(
                    dg.AssetMaterialization(
                        asset_key=key(name),
                        partition=partition,
                        tags={"dagster/data_version": version, "dagster/code_version": node.code_version},
                    )
                )


@pytest.fixture
def project(tmp_path, instance):
    return Project(tmp_path, instance)


def chain(*partitions, names=CHAIN):
    return {n: set(partitions) for n in names}


def baseline(project, *names):
    """Targets ``names`` registered and everything materialized once (as `make run` leaves a project), then
    the sensor's first tick: it requests nothing, neither the existing targets nor anything else."""
    for name in names:
        project.add_target(name)
    project.sync_registry()
    project.materialize({**{n: {None} for n in SHARED}, **chain(*names)})
    assert project.tick() == {}


def test_first_tick_on_a_fresh_registry_does_not_request_every_target(project):
    project.add_target("arith")
    project.sync_registry()
    assert project.tick() == {}  # the baseline: missing before automation started is not "newly" missing
    project.materialize({n: {None} for n in SHARED})  # e.g. from the UI
    requested = project.tick()
    assert requested == chain("arith")  # its inputs got data versions: now it follows them, the chain at once
    project.materialize(requested)
    project.add_target("reading")
    project.sync_registry()
    assert project.tick() == chain("reading")  # the whole chain in one tick


def test_adding_a_target_requests_exactly_its_chain(project):
    baseline(project, "arith")
    project.add_target("reading")
    result = project.sync_registry()
    assert [list(r.partition_keys) for r in result.dynamic_partitions_requests] == [["reading"]]
    requested = project.tick()
    assert requested == chain("reading")
    project.materialize(requested)
    assert project.tick() == {}  # what ran is not requested again


def test_editing_one_dev_file_requests_only_that_partition(project):
    baseline(project, "arith", "reading")
    (project.data / "reading" / "dev.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "new"}]}\n'
    )
    project.sync_registry()
    assert project.tick() == chain("reading")


def test_unchanged_rerun_of_the_shared_assets_requests_nothing(project):
    baseline(project, "arith")
    project.materialize({n: {None} for n in SHARED}, data_version="same")  # same content, same data versions
    assert project.tick() == {}
    project.materialize({"embeddings": {None}}, data_version="changed")  # a real change reaches the targets
    # the shared assets that read the embeddings follow them in the same tick (landmarks: the coverage strategies
    # choose by embedding; with `random` the re-run finds its gradient shards cached), and the targets' weights
    # follow the coefficients, and the landmark influence follows the embeddings (each target's refinement
    # landmarks are the pool samples nearest its dev examples in embedding space); the target gradients do not
    assert project.tick() == {"landmarks": {None}, "propagation": {None}, **chain("arith", names=CHAIN[1:])}


def test_landmark_count_edit_requests_the_landmark_dependent_assets_of_every_target_only(project):
    baseline(project, "arith", "reading")
    project.set_profile(recipe={"num_landmarks": 16})
    assert project.tick() == {"landmarks": {None}, "propagation": {None}}  # shared, so in the same tick
    project.materialize({"landmarks": {None}, "propagation": {None}}, data_version="16-landmarks")
    # the next tick: every target's landmark-dependent assets, not its target gradients, nothing shared
    assert project.tick() == chain("arith", "reading", names=AFTER_LANDMARKS)


def test_registry_sensor_launches_nothing_and_removes_deleted_targets():
    first = registry_tick({"arith": "v1", "mcq": "v1"}, set(), None)
    assert first.run_requests == []
    (add,) = first.dynamic_partitions_requests
    assert list(add.partition_keys) == ["arith", "mcq"]
    assert {o.partition for o in first.asset_events} == {"arith", "mcq"}
    assert isinstance(
        registry_tick({"arith": "v1", "mcq": "v1"}, {"arith", "mcq"}, first.cursor), dg.SkipReason
    )
    removed = registry_tick({"arith": "v1"}, {"arith", "mcq"}, first.cursor)
    (delete,) = removed.dynamic_partitions_requests
    assert (
        list(delete.partition_keys) == ["mcq"] and removed.asset_events == [] and removed.run_requests == []
    )


def test_profile_fields_reach_only_the_assets_that_read_them(tmp_path):
    before = code_versions(load_settings(write_profile(tmp_path)))
    after = code_versions(load_settings(write_profile(tmp_path, num_landmarks=7)))
    assert {n for n in before if before[n] != after[n]} == {"landmarks"}
    embed = code_versions(load_settings(write_profile(tmp_path, max_length=99)))
    changed = {n for n in before if before[n] != embed[n]}
    assert {"embeddings", "warmup", "landmarks", "target_gradients", "finetuned_checkpoint"} <= changed
    assert "propagated_weights" not in changed and "pool" not in changed


def test_heavy_automation_is_off_by_default_and_one_switch_turns_it_on(tmp_path):
    defs = build_definitions(str(write_profile(tmp_path)))
    sensors = {s.name: s for s in defs.sensors}
    assert sensors["automation_heavy"].default_status == dg.DefaultSensorStatus.STOPPED
    assert sensors["automation"].default_status == dg.DefaultSensorStatus.RUNNING


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


def test_a_mix_is_built_once_its_targets_are_and_follows_their_weights(project):
    from idistill_assets.partitions import mixes

    baseline(project, "arith", "reading")
    (project.targets_dir / "mixes").mkdir()
    (project.targets_dir / "mixes" / "both.yaml").write_text(
        "name: both\ntargets: {arith: 1, reading: 1}\nbudget: 10\n"
    )
    tick = registry_tick({"both": "v1"}, set(), None, mixes, "mix_spec", "mix")
    (add,) = tick.dynamic_partitions_requests
    project.instance.add_dynamic_partitions("mixes", list(add.partition_keys))
    for event in tick.asset_events:
        project.instance.report_runless_asset_event(event)
    assert project.tick() == {"mixed_subset": {"both"}}  # newly missing: built from the targets' weights
    project.instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=key("mixed_subset"), partition="both", tags={"dagster/data_version": "m1"})
    )
    assert project.tick() == {}
    project.materialize({"propagated_weights": {"arith"}}, data_version="changed")
    requested = project.tick()
    assert requested["mixed_subset"] == {"both"} and requested["selected_subset"] == {"arith"}
