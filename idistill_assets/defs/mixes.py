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

    known = load_registry(res.settings.targets_dir, res.settings.data_roots)
    return load_mix_spec(mixes_dir(res.settings.targets_dir) / f"{name}.yaml", known), known


@dg.observable_source_asset(key=[PREFIX, "mix_spec"], partitions_def=mixes, group_name=MIX)
def mix_spec(context, idistill: IdistillResource):
    """Each mix's YAML spec (targets, weights, budget, cap); its data version changes when the file changes."""
    from idistill_core.project.mixes import load_mixes
    from idistill_core.project.targets import load_registry

    known_targets = load_registry(idistill.settings.targets_dir, idistill.settings.data_roots)
    specs = load_mixes(idistill.settings.targets_dir, known_targets)
    known = set(context.instance.get_dynamic_partitions(mixes.name))
    return dg.DataVersionsByPartition({name: spec.version() for name, spec in specs.items() if name in known})


@dg.asset(
    key=[PREFIX, "mixed_subset"],
    # every target's weights feed every mix (a partition mapping cannot read the mix file); the asset reads
    # only the targets its file names
    deps=[mix_spec, dg.AssetDep(propagated_weights, partition_mapping=dg.AllPartitionMapping()), pool],
    partitions_def=mixes,
    group_name=MIX,
    kinds={"parquet"},
    code_version="mix-v1",
    check_specs=[dg.AssetCheckSpec("mix_valid", asset=[PREFIX, "mixed_subset"], blocking=True)],
)
def mixed_subset(context: dg.AssetExecutionContext, idistill: IdistillResource) -> dg.MaterializeResult:
    """One subset for several targets: each target gets its weight's share of the budget, picked round-robin by
    its own score (per-source cap honoured); same files and columns as ``selected_subset`` plus ``target``."""
    import polars as pl

    from idistill_core.errors import ConfigError
    from idistill_core.project.mixes import mix_selection

    spec, registry = mix_spec_for(idistill, context.partition_key)
    scored, methods = {}, {}
    for target in spec.targets:
        try:
            path = target_dir(idistill, target, "propagated_weights") / "propagated_weights.parquet"
        except ConfigError:
            raise ConfigError(f"{spec.source_file}: target {target!r} has no materialized propagated_weights; "
                              "materialize that target first.") from None
        frame = pl.read_parquet(path, columns=["sample_id", "score"])
        scored[target] = (frame["sample_id"].to_list(), frame["score"].to_numpy())
        methods[target] = registry[target].method
    recipe_cap = idistill.settings.recipe.per_source_cap
    cap = spec.per_source_cap if spec.per_source_cap is not None else recipe_cap
    outcome = mix_selection(spec, scored, methods, recipe_cap, pool_sources(idistill) if cap is not None else None)

    names = list(spec.targets)
    picked_by = [names[t] for t in outcome.details["picked_by"]]
    score_of = {t: dict(zip(ids, s.tolist(), strict=True)) for t, (ids, s) in scored.items()}
    weight_of = dict(zip(outcome.sample_ids, outcome.weights.tolist(), strict=True))
    chosen = pl.DataFrame(
        {
            "sample_id": outcome.selected,
            "weight": [weight_of[s] for s in outcome.selected],
            "score": [score_of[t][s] for t, s in zip(picked_by, outcome.selected, strict=True)],
            "rank": list(range(len(outcome.selected))),
            "target": picked_by,
        },
        schema={"sample_id": pl.String, "weight": pl.Float64, "score": pl.Float64, "rank": pl.Int64, "target": pl.String},
    )
    pool_rows = pl.read_parquet(pool_path(idistill))
    subset = chosen.join(pool_rows, on="sample_id", how="left").sort("rank")
    staging = idistill.staging("mixed_subset", spec.name)
    subset.write_parquet(staging / "subset.parquet")
    subset.write_ndjson(staging / "subset.jsonl")
    version, folder = idistill.commit(staging)

    budgets = dict(zip(names, outcome.details["budgets"], strict=True))
    got = {t: picked_by.count(t) for t in names}
    counts = source_counts(subset)
    pool_counts = source_counts(pool_rows)
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
