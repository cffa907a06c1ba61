"""The asset graph on a tiny project: definitions, a full materialization, and incremental recompute."""

import dagster as dg
import numpy as np
import polars as pl
import pytest

from idistill_assets.definitions import build_definitions
from idistill_assets.resources import IdistillResource, current_dir
from idistill_core.project.settings import load_settings

from .conftest import write_profile, write_target

PER_TARGET = [
    "target_gradients",
    "landmark_influence",
    "propagated_weights",
    "selected_subset",
    "finetuned_checkpoint",
    "random_checkpoint",
    "eval_scores",
]
SHARED = ["pool", "base_model", "embeddings", "warmup", "landmarks", "propagation", "rds_features"]


def key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["idistill", name])


def materializations(instance, name: str) -> int:
    return len(instance.fetch_materializations(key(name), limit=1000).records)


def run_shared(defs, instance):
    result = defs.resolve_job_def("shared_job").execute_in_process(instance=instance)
    assert result.success


def run_target(defs, instance, name: str, job: str = "target_job"):
    if name not in instance.get_dynamic_partitions("targets"):
        instance.add_dynamic_partitions("targets", [name])
    result = defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=name)
    assert result.success
    return result


def test_definitions_load_with_the_documented_graph():
    defs = build_definitions("profiles/tiny.yaml")
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {f"idistill/{n}" for n in SHARED + PER_TARGET + ["target_spec"]} <= keys
    for name in PER_TARGET:
        node = graph.get(key(name))
        assert node.partitions_def is not None and node.partitions_def.name == "targets", name
        assert node.code_version, name
    for name in SHARED:
        assert graph.get(key(name)).partitions_def is None, name
    assert key("embeddings") in graph.get(key("propagated_weights")).parent_keys
    assert key("propagation") in graph.get(key("propagated_weights")).parent_keys
    assert {key("embeddings"), key("landmarks")} <= graph.get(key("propagation")).parent_keys
    assert key("landmarks") in graph.get(key("landmark_influence")).parent_keys
    assert key("target_spec") in graph.get(key("target_gradients")).parent_keys
    assert key("selected_subset") in graph.get(key("finetuned_checkpoint")).parent_keys


def test_whole_graph_materializes_with_consistent_outputs(project, instance):
    profile, _ = project
    defs = build_definitions(str(profile))
    run_shared(defs, instance)
    run_target(defs, instance, "arith")
    res = IdistillResource(profile=str(profile))
    pool_ids = set(pl.read_parquet(res.current("pool") / "pool.parquet")["sample_id"])
    weights = pl.read_parquet(res.current("propagated_weights", "arith") / "propagated_weights.parquet")
    assert set(weights["sample_id"]) == pool_ids  # every pool sample gets a score and a weight
    assert np.isfinite(weights["score"].to_numpy()).all()
    assert abs(weights["weight"].sum() - len(pool_ids)) < 1e-6 * len(pool_ids)
    subset = pl.read_parquet(res.current("selected_subset", "arith") / "subset.parquet")
    assert subset.height == 12 and subset["sample_id"].n_unique() == 12
    assert set(subset["sample_id"]) <= pool_ids
    assert (subset["weight"] > 0).all()
    eval_rows = {row["model"] for row in __import__("json").loads((res.current("eval_scores", "arith") / "eval_scores.json").read_text())["rows"]}
    assert eval_rows == {"base", "influence_distillation", "random"}
    # the paired gap over test rows: for an accuracy its mean is the two scores' difference, inside its interval
    meta = instance.get_latest_materialization_event(key("eval_scores")).asset_materialization.metadata
    gap = meta["score_influence_distillation"].value - meta["score_random"].value
    assert meta["id_minus_random"].value == pytest.approx(gap, abs=1e-12)
    assert meta["id_minus_random_ci95_low"].value <= gap <= meta["id_minus_random_ci95_high"].value
    low, high = meta["id_minus_random_ci95_low"].value, meta["id_minus_random_ci95_high"].value
    assert meta["gap_within_noise"].value == (low <= 0 <= high)
    checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(key("selected_subset"), "subset_valid"), dg.AssetCheckKey(key("embeddings"), "embeddings_valid")]
    )
    assert len(checks) == 2


def test_second_target_and_grown_pool_embed_only_what_is_new(project, instance, tmp_path):
    profile, targets_dir = project
    defs = build_definitions(str(profile))
    run_shared(defs, instance)
    run_target(defs, instance, "arith", job="selection_job")
    rows_before = IdistillResource(profile=str(profile)).store().count()
    assert materializations(instance, "embeddings") == 1

    write_target(targets_dir, "reading")
    run_target(defs, instance, "reading", job="selection_job")
    assert materializations(instance, "embeddings") == 1  # a new target never re-embeds
    assert IdistillResource(profile=str(profile)).store().count() == rows_before
    assert (IdistillResource(profile=str(profile)).current("selected_subset", "reading") / "subset.parquet").exists()

    grown = write_profile(tmp_path, pool_size=120)
    defs = build_definitions(str(grown))
    run_shared(defs, instance)
    latest = instance.get_latest_materialization_event(key("embeddings")).asset_materialization.metadata
    grown_rows = IdistillResource(profile=str(grown)).store().count()
    assert latest["inserted"].value == grown_rows - rows_before > 0  # only the new pool rows were embedded
    assert latest["already_present"].value == rows_before


def test_pool_that_shrinks_under_a_shared_store_gets_weights_for_exactly_its_samples(project, instance, tmp_path):
    big = write_profile(tmp_path, pool_size=120)
    defs = build_definitions(str(big))
    run_shared(defs, instance)
    small = write_profile(tmp_path, pool_size=40)  # same home, so the same LanceDB table holds both pools
    defs = build_definitions(str(small))
    run_shared(defs, instance)
    run_target(defs, instance, "arith", job="selection_job")
    settings = load_settings(small)
    pool_ids = set(pl.read_parquet(current_dir(settings, "pool") / "pool.parquet")["sample_id"])

    assert IdistillResource(profile=str(small)).store().count() > len(pool_ids)  # the table is shared
    weights = pl.read_parquet(current_dir(settings, "propagated_weights", "arith") / "propagated_weights.parquet")
    assert weights.height == len(pool_ids) and set(weights["sample_id"]) == pool_ids
    assert abs(weights["weight"].sum() - len(pool_ids)) < 1e-6 * len(pool_ids)
    subset = pl.read_parquet(current_dir(settings, "selected_subset", "arith") / "subset.parquet")
    assert set(subset["sample_id"]) <= pool_ids and subset.height == 12


def test_rematerializing_keeps_the_earlier_version_and_opt_out_targets_skip_visibly(project, instance):
    profile, targets_dir = project
    write_target(targets_dir, "gsm", finetune=False, dev="builtin/targets/arith/dev.jsonl",
                 test="builtin/targets/arith/test.jsonl")
    defs = build_definitions(str(profile))
    run_shared(defs, instance)
    first = instance.get_latest_materialization_event(key("pool")).asset_materialization.metadata["dagster/uri"].value
    run_target(defs, instance, "gsm")
    for name in ("finetuned_checkpoint", "random_checkpoint", "eval_scores"):
        assert instance.get_latest_materialization_event(key(name)) is None, name
    observation = instance.fetch_observations(key("finetuned_checkpoint"), limit=1).records[0]
    assert "finetune: false" in observation.asset_observation.metadata["skipped"].value
    assert materializations(instance, "selected_subset") == 1  # the selection itself ran
    grown = write_profile(profile.parent, pool_size=120)
    run_shared(build_definitions(str(grown)), instance)
    second = instance.get_latest_materialization_event(key("pool")).asset_materialization.metadata["dagster/uri"].value
    assert second != first and pl.read_parquet(first).height == 96 and pl.read_parquet(second).height == 120


def test_rds_pool_features_are_an_empty_marker_without_rds_targets_and_computed_once_for_all_of_them(
    project, instance, monkeypatch
):
    from idistill_core.methods import rds as baselines

    profile, targets_dir = project
    seen: list[str] = []
    original = baselines.rds_embeddings

    def counting(model, batches):
        ids, emb = original(model, batches)
        seen.extend(ids)
        return ids, emb

    monkeypatch.setattr(baselines, "rds_embeddings", counting)

    def run_rds_features(defs):  # alone: one full shared run below is enough (landmark gradients dominate)
        job = defs.resolve_job_def("shared_job")
        assert job.execute_in_process(instance=instance, asset_selection=[key("rds_features")]).success

    defs = build_definitions(str(profile))
    run_rds_features(defs)  # only 'arith' (method id): no pool forward for RDS+
    assert seen == [] and materializations(instance, "rds_features") == 1  # an empty marker, no features
    marker = instance.get_latest_materialization_event(key("rds_features")).asset_materialization.metadata
    assert "uses method rds" in marker["skipped"].value and marker["dagster/row_count"].value == 0

    write_target(targets_dir, "reading", method="rds")
    write_target(targets_dir, "gsm", method="rds", finetune=False, budget=8,
                 dev="builtin/targets/arith/dev.jsonl", test="builtin/targets/arith/test.jsonl")
    defs = build_definitions(str(profile))
    run_shared(defs, instance)
    res = IdistillResource(profile=str(profile))
    pool_ids = set(pl.read_parquet(res.current("pool") / "pool.parquet")["sample_id"])
    assert sorted(seen) == sorted(pool_ids)  # once, in the shared stage
    meta = instance.get_latest_materialization_event(key("rds_features")).asset_materialization.metadata
    assert meta["dagster/row_count"].value == len(pool_ids) and meta["inserted"].value == len(pool_ids)
    assert meta["dimension"].value == res.load_model().model.config.hidden_size and meta["used_by"].value == "gsm, reading"
    for name in ("reading", "gsm"):
        seen.clear()
        run_target(defs, instance, name, job="selection_job")
        assert not set(seen) & pool_ids and seen  # only the target's own dev samples were embedded
        subset = pl.read_parquet(res.current("selected_subset", name) / "subset.parquet")
        assert subset.height == (10 if name == "reading" else 8)
    run_rds_features(defs)  # a re-run finds every id present
    meta = instance.get_latest_materialization_event(key("rds_features")).asset_materialization.metadata
    assert meta["inserted"].value == 0 and meta["already_present"].value == len(pool_ids)


def test_adam_second_order_target_materializes_with_its_budget_curve(tmp_path, instance):
    """``optimizer: adam`` and ``order: second`` through the assets: the warm-up runs, the second-order terms are
    stored with the landmark influence, and the propagated weights report the model's predicted loss change and
    the budget curve (whose point at the target's budget is the selection's own prediction)."""
    targets_dir = tmp_path / "targets"
    targets_dir.mkdir()
    write_target(targets_dir, "arith", order="second")
    profile = write_profile(tmp_path, optimizer="adam")
    defs = build_definitions(str(profile))
    run_shared(defs, instance)
    run_target(defs, instance, "arith")
    warm = instance.get_latest_materialization_event(key("warmup")).asset_materialization.metadata
    assert warm["enabled"].value is True
    meta = instance.get_latest_materialization_event(key("propagated_weights")).asset_materialization.metadata
    assert np.isfinite(meta["second_order_predicted_change"].value)
    assert meta["second_order_predicted_change"].value != meta["first_order_predicted_change"].value
    assert "budget_curve" in meta and "data:image/png;base64," in meta["budget_curve"].value
    rows = {r.data["k"]: r.data for r in meta["budget_curve_table"].value.records}
    assert rows[12]["predicted_change"] == pytest.approx(meta["second_order_predicted_change"].value, rel=5e-3)
    res = IdistillResource(profile=str(profile))
    weights = pl.read_parquet(res.current("propagated_weights", "arith") / "propagated_weights.parquet")
    subset = pl.read_parquet(res.current("selected_subset", "arith") / "subset.parquet")
    assert np.count_nonzero(weights["weight"].to_numpy()) == subset.height == 12
    np.testing.assert_array_equal(weights["score"].to_numpy(), weights["weight"].to_numpy())  # weights rank
