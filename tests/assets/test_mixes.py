"""Per-source caps and multi-target mixes through the assets, on the tiny project: what is written is counted
again from the pool file and compared with the core selectors on the same scores."""

from collections import Counter

import numpy as np
import polars as pl
import pytest
import yaml

from idistill_assets.definitions import build_definitions
from idistill_assets.resources import IdistillResource
from idistill_core.errors import ConfigError
from idistill_core.steps.select import mix_budgets, select_mix

from .conftest import write_target
from .test_pipeline import key, run_shared, run_target


def _source_of(res) -> dict[str, str]:
    pool = pl.read_parquet(res.current("pool") / "pool.parquet")
    return dict(zip(pool["sample_id"], pool["source"]))


def _scores(res, target: str) -> dict[str, float]:
    frame = pl.read_parquet(res.current("propagated_weights", target) / "propagated_weights.parquet")
    return dict(zip(frame["sample_id"], frame["score"]))


def _write_mix(targets_dir, name: str, **fields):
    folder = targets_dir / "mixes"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **fields}, sort_keys=False))


def _run_mix(defs, instance, name: str, raise_on_error: bool = True):
    if name not in instance.get_dynamic_partitions("mixes"):
        instance.add_dynamic_partitions("mixes", [name])
    return defs.resolve_job_def("mix_job").execute_in_process(
        instance=instance, partition_key=name, raise_on_error=raise_on_error
    )


def test_target_cap_and_mixes_limit_and_split_the_written_subsets(project, instance):
    """One tiny project for both (the shared assets are the slow part): arith has a per_source_cap of 2."""
    profile, targets_dir = project
    write_target(targets_dir, "arith", per_source_cap=2)
    write_target(targets_dir, "reading")
    _write_mix(targets_dir, "both", targets={"arith": 2, "reading": 1}, budget=15)
    _write_mix(targets_dir, "capped", targets={"reading": 1, "arith": 1}, budget=10, per_source_cap=2)
    defs = build_definitions(str(profile))
    run_shared(defs, instance)
    run_target(defs, instance, "arith", job="selection_job")
    res = IdistillResource(profile=str(profile))
    source_of = _source_of(res)

    # the target's cap: every source at most 2 in the written subset, counted from the pool file
    subset = pl.read_parquet(res.current("selected_subset", "arith") / "subset.parquet")
    counts = Counter(source_of[s] for s in subset["sample_id"])
    assert subset.height == 12 and max(counts.values()) <= 2
    # independent greedy: best score first (ties by id), skipping sources that are full
    scores = _scores(res, "arith")
    expected, taken = [], Counter()
    for sid in sorted(scores, key=lambda s: (-scores[s], s)):
        if taken[source_of[sid]] < 2:
            taken[source_of[sid]] += 1
            expected.append(sid)
    assert subset["sample_id"].to_list() == expected[:12]
    uncapped = sorted(scores, key=lambda s: (-scores[s], s))[:12]
    assert max(Counter(source_of[s] for s in uncapped).values()) > 2  # the cap really changed the subset
    meta = instance.get_latest_materialization_event(key("selected_subset")).asset_materialization.metadata
    assert meta["per_source_cap"].value == 2

    # mixes re-select from both targets' scores: the counts mix_budgets promises, the ids select_mix gives
    run_target(defs, instance, "reading", job="selection_job")
    scores = {t: _scores(res, t) for t in ("arith", "reading")}
    ids = sorted(scores["arith"])
    assert _run_mix(defs, instance, "both").success
    subset = pl.read_parquet(res.current("mixed_subset", "both") / "subset.parquet")
    direct = select_mix(ids, [np.array([scores[t][s] for s in ids]) for t in ("arith", "reading")], 15, [2, 1])
    assert subset["sample_id"].to_list() == direct.sample_ids
    per_target = Counter(subset["target"])
    assert [per_target["arith"], per_target["reading"]] == mix_budgets(15, [2, 1]) == [10, 5]
    meta = instance.get_latest_materialization_event(key("mixed_subset")).asset_materialization.metadata
    assert meta["budget_split"].value == "arith 10, reading 5"
    assert "| arith | 2 | 66.7% | 10 | 10 |" in meta["per_target"].value

    assert _run_mix(defs, instance, "capped").success
    capped = pl.read_parquet(res.current("mixed_subset", "capped") / "subset.parquet")
    counts = Counter(source_of[s] for s in capped["sample_id"])
    assert capped.height == 10 and max(counts.values()) <= 2
    direct = select_mix(
        ids, [np.array([scores[t][s] for s in ids]) for t in ("reading", "arith")], 10, [1, 1],
        sources=[source_of[s] for s in ids], per_source_cap=2,
    )
    assert capped["sample_id"].to_list() == direct.sample_ids


def test_bad_target_cap_fails_before_any_work_naming_the_file(project, instance):
    profile, targets_dir = project
    path = write_target(targets_dir, "arith", per_source_cap=0)
    defs = build_definitions(str(profile))
    instance.add_dynamic_partitions("targets", ["arith"])
    with pytest.raises(ConfigError, match="per_source_cap") as info:
        defs.resolve_job_def("selection_job").execute_in_process(instance=instance, partition_key="arith")
    assert str(path) in str(info.value)
    assert instance.get_latest_materialization_event(key("target_gradients")) is None


def test_mix_with_an_unknown_or_unbuilt_target_fails_naming_the_mix_file(project, instance):
    profile, targets_dir = project
    write_target(targets_dir, "reading")
    defs = build_definitions(str(profile))
    _write_mix(targets_dir, "unknown", targets={"arith": 1, "poetry": 1}, budget=10)
    with pytest.raises(ConfigError, match=r"unknown\.yaml: field 'targets' names unknown target 'poetry'"):
        _run_mix(defs, instance, "unknown")
    _write_mix(targets_dir, "unbuilt", targets={"arith": 1, "reading": 1}, budget=10)
    with pytest.raises(ConfigError, match=r"unbuilt\.yaml: target 'arith' has no materialized propagated_weights"):
        _run_mix(defs, instance, "unbuilt")
