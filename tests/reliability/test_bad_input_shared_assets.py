"""Issue 6.2, asset side, on a tiny project whose shared assets are built once: a bad target (YAML or dev file),
an out-of-range budget or landmark count, or a recipe that does not match the embedding table fails the run
with one line and leaves no new artefact, no new LanceDB row and the previous landmark file untouched."""

import pytest
import yaml

from idistill_assets.resources import current_dir
from idistill_core.project.settings import load_settings
from tests.assets.conftest import write_target

from .conftest import (
    assert_run_fails_with,
    bad_files,
    edit_profile,
    failure_messages,
    run_assets,
    store_rows,
    tiny_project,
)


# ---------------------------------------------------------------------------------------------------------
# one built tiny project for the module
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import dagster as dg

    root = tmp_path_factory.mktemp("built")
    profile = tiny_project(root, pool_size=96)
    with dg.instance_for_test() as inst:
        result = run_assets(profile, inst)
        assert result.success, failure_messages(result)
        yield profile, inst


def _target_case(built, name: str, **fields) -> tuple:
    profile, inst = built
    settings = load_settings(profile)
    write_target(settings.targets_dir, name, **fields)
    return run_assets(profile, inst, partition=name), settings.artifacts


@pytest.mark.parametrize(
    ("name", "fields", "error", "fragments"),
    [
        (
            "unknown-metric",
            {"metric": "bleu"},
            "ConfigError",
            ["unknown-metric.yaml", "field 'metric' = 'bleu' is unknown"],
        ),
        (
            "zero-budget",
            {"budget": 0},
            "ConfigError",
            ["zero-budget.yaml", "field 'budget' must be a positive integer"],
        ),
        (
            "escape",
            {"dev": "../../../../etc/passwd"},
            "ConfigError",
            ["escape.yaml", "field 'dev'", "escapes the data roots"],
        ),
        ("empty-target", {"dev": "bad/empty.jsonl"}, "DataError", ["empty.jsonl", "empty dataset"]),
        ("broken-target", {"dev": "bad/malformed.jsonl"}, "DataError", ["malformed.jsonl:3"]),
    ],
)
def test_bad_target_fails_its_partition_with_one_line_and_writes_nothing(
    built, name, fields, error, fragments
):
    settings = load_settings(built[0])
    bad_files(settings.data_root / "bad")
    result, folder = _target_case(built, name, **fields)
    assert_run_fails_with(result, error, *fragments)
    written = [p for p in folder.glob(f"*/{name}/*") if not p.name.startswith(".staging")]
    assert not written, written


def test_target_yaml_missing_a_field_fails_with_its_name(built):
    profile, inst = built
    settings = load_settings(profile)
    path = write_target(settings.targets_dir, "no-test")
    spec = yaml.safe_load(path.read_text())
    del spec["test"]
    path.write_text(yaml.safe_dump(spec))
    result = run_assets(profile, inst, partition="no-test")
    assert_run_fails_with(result, "ConfigError", "no-test.yaml", "missing required field(s) test")


def test_budget_above_pool_size_fails_before_weights_or_subset_are_written(built):
    result, folder = _target_case(built, "big-budget", budget=97, dev="builtin/targets/arith/dev.jsonl")
    assert_run_fails_with(result, "ConfigError", "budget k=97 must satisfy 0 < k <= N=96")
    assert not (folder / "propagated_weights" / "big-budget" / "current.json").exists()
    assert not (folder / "selected_subset" / "big-budget" / "current.json").exists()


@pytest.mark.parametrize(
    ("landmarks", "fragment"),
    [
        (97, "num_landmarks=97 exceeds the pool size N=96"),
        (0, "SelectionRecipe.num_landmarks must be > 0; got 0"),
    ],
)
def test_landmark_count_out_of_range_fails_the_landmarks_asset_and_keeps_the_old_file(
    built, tmp_path, landmarks, fragment
):
    profile, inst = built
    path = current_dir(load_settings(profile), "landmarks") / "landmarks.safetensors"
    before = path.read_bytes()
    other = tmp_path / "profile.yaml"
    other.write_text(profile.read_text())
    edit_profile(other, recipe={"num_landmarks": landmarks})
    assert_run_fails_with(run_assets(other, inst, ["landmarks"]), "ConfigError", fragment)
    assert path.read_bytes() == before
    assert not list(path.parent.parent.glob("shards-*"))
    assert current_dir(load_settings(profile), "landmarks") == path.parent  # the old version stays current


def test_embedding_table_of_another_recipe_is_refused_and_left_untouched(built, tmp_path):
    profile, inst = built
    settings = load_settings(profile)
    rows = store_rows(settings.lancedb_uri)
    other = tmp_path / "profile.yaml"
    other.write_text(profile.read_text())
    edit_profile(
        other, recipe={"embed": {"num_blocks": 2, "num_tangents": 2, "proj_dim": 32, "batch_size": 8}}
    )
    result = run_assets(other, inst, ["embeddings"])
    assert_run_fails_with(
        result,
        "StoreError",
        f"LanceDB table '{settings.embeddings_table}'",
        "another model or recipe",
        "dim=96 (run asks 64)",  # proj_dim 64 / 32 beside the tiny model's 32-wide final hidden state
    )
    assert store_rows(settings.lancedb_uri) == rows
