"""Multi-target mixes (one partition per targets/mixes/<name>.yaml): one subset for several targets at once,
re-selected from the targets' own scores (their current ``propagated_weights``), so a mix costs a parquet read
per target and a round-robin, never a gradient."""

import dagster as dg

from idistill_assets import plots
from idistill_assets.defs.shared import PREFIX, pool
from idistill_assets.defs.targets import SUBSET_COLUMNS, pool_sources, propagated_weights, target_dir
from idistill_assets.partitions import mixes
from idistill_assets.resources import IdistillResource
from idistill_assets.upstream import pool_path, source_counts

MIX = "mix"
MIX_COLUMNS = {**SUBSET_COLUMNS, "score": "the picking target's influence score", "target": "target that picked it"}


def mix_spec_for(res: IdistillResource, name: str):
    from idistill_core.project.mixes import load_mix_spec, mixes_dir
    from idistill_core.project.targets import load_registry

    # an invalid target file makes only that target unknown here (its own check reports why)
    known = load_registry(res.settings.targets_dir, res.settings.data_roots, errors={})
    return load_mix_spec(mixes_dir(res.settings.targets_dir) / f"{name}.yaml", known), known


@dg.observable_source_asset(key=[PREFIX, "mix_spec"], partitions_def=mixes, group_name=MIX)
def mix_spec(context, idistill: IdistillResource):
    """Each mix's YAML spec (targets, weights, budget, cap); its data version changes when the file changes. An
    invalid file is not observed: its one-line error is logged here and fails the `registry_valid` check."""
    from idistill_assets.defs.automation import mix_versions

    errors: dict[str, str] = {}
    versions = mix_versions(idistill, errors)
    for line in errors.values():
        context.log.error(line)
    known = set(context.instance.get_dynamic_partitions(mixes.name))
    return dg.DataVersionsByPartition({name: version for name, version in versions.items() if name in known})


@dg.asset_check(asset=mix_spec, name="registry_valid", description="Every targets/mixes/*.yaml file can be read; "
                "fails with each invalid file's one-line error (the mix registry sensor reports it on every change).")
def mix_registry_valid(idistill: IdistillResource) -> dg.AssetCheckResult:
    from idistill_assets.defs.automation import mix_versions, registry_check

    errors: dict[str, str] = {}
    mix_versions(idistill, errors)
    evaluation = registry_check(errors, "mix_spec", "mix")
    return dg.AssetCheckResult(passed=evaluation.passed, description=evaluation.description, metadata=evaluation.metadata)


def _target_scores(res: IdistillResource, spec, registry) -> tuple[dict, dict]:
    """Each target's current scores ``{target: (ids, scores)}`` and method, read from its propagated_weights."""
    import polars as pl

    from idistill_core.errors import ConfigError

    scored, methods = {}, {}
    for target in spec.targets:
        try:
            path = target_dir(res, target, "propagated_weights") / "propagated_weights.parquet"
        except ConfigError:
            raise ConfigError(f"{spec.source_file}: target {target!r} has no materialized propagated_weights; "
                              "materialize that target first.") from None
        frame = pl.read_parquet(path, columns=["sample_id", "score"])
        scored[target] = (frame["sample_id"].to_list(), frame["score"].to_numpy())
        methods[target] = registry[target].method
    return scored, methods


def _chosen(outcome, names: list[str], scored: dict):
    """The picked rows in pick order: sample_id, weight, the picking target's score, rank, target."""
    import polars as pl

    picked_by = [names[t] for t in outcome.details["picked_by"]]
    score_of = {t: dict(zip(ids, s.tolist(), strict=True)) for t, (ids, s) in scored.items()}
    weight_of = dict(zip(outcome.sample_ids, outcome.weights.tolist(), strict=True))
    return pl.DataFrame(
        {
            "sample_id": outcome.selected,
            "weight": [weight_of[s] for s in outcome.selected],
            "score": [score_of[t][s] for t, s in zip(picked_by, outcome.selected, strict=True)],
            "rank": list(range(len(outcome.selected))),
            "target": picked_by,
        },
        schema={"sample_id": pl.String, "weight": pl.Float64, "score": pl.Float64, "rank": pl.Int64, "target": pl.String},
    )


def _mix_problems(subset, spec, budgets: dict, got: dict, cap: int | None, counts: dict) -> list[str]:
    """What the blocking ``mix_valid`` check reports."""
    problems = []
    if subset.height != spec.budget:
        problems.append(f"{subset.height} rows, budget {spec.budget}")
    if subset["sample_id"].n_unique() != subset.height:
        problems.append("duplicate sample ids")
    if subset["messages"].null_count():
        problems.append("ids missing from the pool")
    if got != budgets:
        problems.append(f"per-target counts {got} differ from the budget split {budgets}")
    if cap is not None and counts and max(counts.values()) > cap:
        problems.append(f"a source has {max(counts.values())} samples, per_source_cap {cap}")
    return problems


def _mix_fields(context, res: IdistillResource, spec, registry, pool_rows) -> tuple[dict, dict | None]:
    """The mix's card fields: the shared provenance plus each target's weight, method and fidelity."""
    from idistill_assets import handoff

    uses_landmarks = any(registry[t].method == "id" for t in spec.targets)
    fields, landmarks = handoff.provenance(res, pool_rows.to_arrow(), uses_landmarks)
    fields.update(
        kind="mix", name=spec.name, budget=spec.budget,
        method={"name": "mix", "targets": ", ".join(f"{t}={registry[t].method}" for t in spec.targets)},
        targets={t: {"weight": spec.targets[t], "method": registry[t].method, "order": registry[t].order,
                     "fidelity_spearman": handoff.latest_metadata(context, "propagated_weights", t, "fidelity_spearman")}
                 for t in spec.targets},
    )
    return fields, landmarks


@dg.asset(
    key=[PREFIX, "mixed_subset"],
    # every target's weights feed every mix (a partition mapping cannot read the mix file); the asset reads
    # only the targets its file names
    deps=[mix_spec, dg.AssetDep(propagated_weights, partition_mapping=dg.AllPartitionMapping()), pool],
    partitions_def=mixes,
    group_name=MIX,
    kinds={"parquet"},
    code_version="mix-v2",
    check_specs=[dg.AssetCheckSpec("mix_valid", asset=[PREFIX, "mixed_subset"], blocking=True)],
)
def mixed_subset(context: dg.AssetExecutionContext, idistill: IdistillResource) -> dg.MaterializeResult:
    """One subset for several targets: each target gets its weight's share of the budget, picked round-robin by
    its own score (per-source cap honoured); same files and columns as ``selected_subset`` plus ``target``, and
    the same hand-off folder (``export/``, docs/handoff.md)."""
    import polars as pl

    from idistill_assets import handoff
    from idistill_core.project.mixes import mix_selection

    spec, registry = mix_spec_for(idistill, context.partition_key)
    scored, methods = _target_scores(idistill, spec, registry)
    recipe_cap = idistill.settings.recipe.per_source_cap
    cap = spec.per_source_cap if spec.per_source_cap is not None else recipe_cap
    outcome = mix_selection(spec, scored, methods, recipe_cap, pool_sources(idistill) if cap is not None else None)
    names = list(spec.targets)
    pool_rows = pl.read_parquet(pool_path(idistill))
    subset = _chosen(outcome, names, scored).join(pool_rows, on="sample_id", how="left").sort("rank")
    staging = idistill.staging("mixed_subset", spec.name)
    subset.write_parquet(staging / "subset.parquet")
    subset.write_ndjson(staging / "subset.jsonl")
    budgets = dict(zip(names, outcome.details["budgets"], strict=True))
    got = {t: subset["target"].to_list().count(t) for t in names}
    counts, pool_counts = source_counts(subset), source_counts(pool_rows)
    problems = _mix_problems(subset, spec, budgets, got, cap, counts)
    fields, landmarks = _mix_fields(context, idistill, spec, registry, pool_rows)
    version, folder, card = handoff.publish(idistill, staging, subset, fields, landmarks, pool_counts, not problems)
    total = sum(spec.weights)
    lines = ["| target | weight | share | budget | picked |", "|---|---|---|---|---|"]
    lines += [
        f"| {t} | {spec.targets[t]:g} | {spec.targets[t] / total:.1%} | {budgets[t]} | {got[t]} |" for t in names
    ]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "dagster/row_count": subset.height,
            "dagster/column_schema": plots.column_schema(subset.schema, MIX_COLUMNS),
            "dagster/uri": str(folder / "subset.parquet"),
            **handoff.card_metadata(card),
            "budget": spec.budget,
            "budget_split": ", ".join(f"{t} {budgets[t]}" for t in names),
            "per_target": dg.MetadataValue.md("\n".join(lines)),
            "per_source_cap": cap if cap is not None else "none",
            **plots.source_composition(counts, pool_counts, f"{spec.name}: mixed subset by source"),
        },
        check_results=[
            dg.AssetCheckResult(check_name="mix_valid", passed=not problems, metadata={"problems": "; ".join(problems) or "none"})
        ],
    )
