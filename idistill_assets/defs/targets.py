"""Per-target assets (one partition per target task): target gradients → landmark influence →
propagated weights → selected subset."""


import time

import dagster as dg
import numpy as np

from idistill_assets import plots
from idistill_assets.defs.shared import (
    PREFIX,
    base_model,
    embeddings,
    landmarks,
    pool,
    propagation,
    rds_features,
    warmup,
)
from idistill_assets.partitions import targets
from idistill_assets.resources import DEVICE_POOL, IdistillResource
from idistill_assets.upstream import (
    embedded_pool,
    fill_rds_features,
    gradient_model,
    load_landmarks,
    load_propagation,
    pool_path,
    source_counts,
    tokenized_pool,
)
from idistill_core.store import artifacts

TARGET = "target"
SUBSET_COLUMNS = {
    "sample_id": "pool sample id (stable across runs)",
    "weight": "training weight; the weights of the selected rows sum to the pool size N over all rows",
    "score": "propagated (or exact) influence on the target: higher helps more",
    "rank": "0 = most influential",
    "source": "pool source the sample came from",
    "messages": "chat turns (role, content), the training text",
}


def target_spec_for(res: IdistillResource, name: str):
    from idistill_core.project.targets import load_target_spec

    return load_target_spec(res.settings.targets_dir / f"{name}.yaml", res.settings.data_roots)


def target_dir(res: IdistillResource, name: str, asset: str):
    """The latest versioned folder of ``asset`` for target ``name`` (see resources.py)."""
    return res.current(asset, name)


def target_rows(spec, which: str = "dev"):
    from idistill_core.data.rows import load_rows

    return load_rows(str(spec.dev if which == "dev" else spec.test), fmt=spec.format, format_option="format:")


@dg.observable_source_asset(key=[PREFIX, "target_spec"], partitions_def=targets, group_name=TARGET)
def target_spec(context, idistill: IdistillResource):
    """Each target's YAML spec and dev/test files; its data version changes when any of them changes. An invalid
    file is not observed (it keeps its last version): its one-line error is logged here and fails the
    `registry_valid` check."""
    from idistill_assets.defs.automation import registry_versions

    errors: dict[str, str] = {}
    versions = registry_versions(idistill, errors)
    for line in errors.values():
        context.log.error(line)
    known = set(context.instance.get_dynamic_partitions(targets.name))
    return dg.DataVersionsByPartition({name: version for name, version in versions.items() if name in known})


@dg.asset_check(asset=target_spec, name="registry_valid", description="Every targets/*.yaml file can be read; "
                "fails with each invalid file's one-line error (the registry sensor reports it on every change).")
def target_registry_valid(idistill: IdistillResource) -> dg.AssetCheckResult:
    from idistill_assets.defs.automation import registry_check, registry_versions

    errors: dict[str, str] = {}
    registry_versions(idistill, errors)
    evaluation = registry_check(errors)
    return dg.AssetCheckResult(passed=evaluation.passed, description=evaluation.description, metadata=evaluation.metadata)


def _partitioned(name: str, deps: list, kinds: set[str], version: str, **kwargs):
    return dg.asset(
        key=[PREFIX, name],
        deps=deps,
        partitions_def=targets,
        group_name=TARGET,
        kinds=kinds,
        code_version=version,
        **kwargs,
    )


@_partitioned(
    "target_gradients", [target_spec, base_model, warmup], {"pytorch", "safetensors"}, "target-grads-v1", pool=DEVICE_POOL
)
def target_gradients(context: dg.AssetExecutionContext, idistill: IdistillResource) -> dg.MaterializeResult:
    """Projected, unit-normalised gradients of the target's dev samples (never preconditioned, paper §3.4)."""
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.pipeline.gradients import compute_gradients

    spec = target_spec_for(idistill, context.partition_key)
    model, tokenizer, _ = gradient_model(idistill)
    recipe = idistill.settings.recipe
    tokenized = tokenize_rows(target_rows(spec, "dev"), tokenizer, recipe.max_length, on_overflow=recipe.on_overflow)
    if len(tokenized.examples) == 0:
        from idistill_core.errors import DataError

        raise DataError(f"target '{spec.name}': no usable dev samples in {spec.dev} (all empty or unsupervised).")
    start = time.perf_counter()
    grads = compute_gradients(model, tokenizer, tokenized.examples, None, idistill.recipe().gradients)
    staging = idistill.staging("target_gradients", spec.name)
    artifacts.save_arrays(
        staging / "target_gradients.safetensors", {"targets": grads.grads.detach().float().numpy()},
        {"ids": grads.sample_ids, "spec": spec.version()},
    )
    version, folder = idistill.commit(staging)
    path = folder / "target_gradients.safetensors"
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "target_samples": len(grads.sample_ids),
            "dropped_samples": len(tokenized.dropped_ids),
            "seconds": round(time.perf_counter() - start, 2),
            "spec_version": spec.version(),
            "dagster/uri": str(path),
            "precision": idistill.precision(recipe.gradients.dtype, "gradients").summary(),
        }
    )


@_partitioned("landmark_influence", [landmarks, target_gradients, embeddings], {"numpy"}, "influence-v2")
def landmark_influence(context: dg.AssetExecutionContext, idistill: IdistillResource) -> dg.MaterializeResult:
    """Exact influence on the target of each landmark, held-out sample and the target's own refinement landmarks
    (first order, paper §4.3), or the second order's p and Q of the landmarks."""
    from idistill_core.methods.id import influence_of

    spec = target_spec_for(idistill, context.partition_key)
    recipe = target_recipe(idistill, spec)
    lm_ids, lm_grads, ho_ids, ho_grads = load_landmarks(idistill)
    arrays, _ = artifacts.load_arrays(target_dir(idistill, spec.name, "target_gradients") / "target_gradients.safetensors")
    landmarks = influence_of(lm_ids, lm_grads, ho_ids, ho_grads, arrays["targets"], recipe)
    out = {"landmarks": landmarks.values, "holdout": landmarks.holdout_values}
    meta, extra = {"landmark_ids": lm_ids, "holdout_ids": ho_ids, "aggregate": spec.aggregate, "order": spec.order}, {}
    if spec.order == "second":
        terms = _second_order(context, idistill, spec, recipe, lm_ids)
        out.update({f"second_{k}": v for k, v in terms.items()})
        extra = {"second_order_q_noise": float(terms["q_noise"][0]), "second_order_lr": float(terms["lr"][0])}
    elif recipe.refine_landmarks:
        refinement = _refinement(context, idistill, spec, recipe, landmarks)
        out["refine"], meta["refine_ids"] = refinement.values, refinement.ids
        extra = {"refinement_landmarks": len(refinement.ids)}
    staging = idistill.staging("landmark_influence", spec.name)
    artifacts.save_arrays(staging / "landmark_influence.safetensors", out, meta)
    version, folder = idistill.commit(staging)
    mean = landmarks.values.mean(axis=1)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "dagster/uri": str(folder / "landmark_influence.safetensors"),
            "landmarks": len(lm_ids),
            "target_columns": int(landmarks.values.shape[1]),
            "influence_mean": round(float(mean.mean()), 4),
            "influence_std": round(float(mean.std()), 4),
            "influence_histogram": plots.histogram(mean, "landmark influence", "mean cosine with target gradients"),
            "order": spec.order,
            **extra,
        }
    )


def target_recipe(res: IdistillResource, spec):
    """The profile's recipe with the target's own method, order, aggregation and cap."""
    import dataclasses

    from idistill_core.project.targets import selection_cap

    cap = selection_cap(spec, res.settings.recipe.per_source_cap)
    return dataclasses.replace(
        res.settings.recipe, method=spec.method, order=spec.order, aggregate=spec.aggregate, per_source_cap=cap
    )


def _second_order(context, res: IdistillResource, spec, recipe, landmark_ids) -> dict:
    """The landmarks' second-order terms on the target (``pipeline.second_order.terms_to_arrays``)."""
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.pipeline.second_order import second_order_terms_for

    model, tokenizer, pre = gradient_model(res)
    dev = tokenize_rows(target_rows(spec, "dev"), tokenizer, recipe.max_length).examples
    return second_order_terms_for(
        model, tokenizer, tokenized_pool(res, tokenizer).examples, dev, landmark_ids, recipe, pre,
        on_progress=context.log.info,
    )


def _refinement(context, res: IdistillResource, spec, recipe, landmarks):
    """The target's own refinement landmarks (``methods.id.refine``): nearest its dev samples in the shared
    embeddings, with exact gradients from the gradient model."""
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.methods.id import refine_ids, target_embeddings
    from idistill_core.pipeline.gradients import compute_gradients

    base = res.load_model()
    dev = tokenize_rows(target_rows(spec, "dev"), base.tokenizer, recipe.max_length).examples
    pool_ids, store = embedded_pool(res)
    emb = target_embeddings(base.model, base.tokenizer, dev, res.recipe())
    ids = refine_ids(store, pool_ids.to_pylist(), landmarks, emb, recipe.refine_landmarks)
    model, tokenizer, pre = gradient_model(res)
    grads = compute_gradients(model, tokenizer, tokenized_pool(res, tokenizer).examples, ids, res.recipe().gradients, pre)
    context.log.info(f"refinement: {len(ids)} landmarks nearest the target's {len(dev)} dev samples")
    return landmarks.refinement(ids, grads.grads, recipe.aggregate)


@_partitioned(
    "propagated_weights",
    # rds_features: read by method rds (optional: skipped while no target uses rds, see automation.OPTIONAL)
    [embeddings, propagation, landmark_influence, pool, rds_features],
    {"numpy", "parquet"},
    "propagate-v2",
    check_specs=[
        dg.AssetCheckSpec("weights_valid", asset=[PREFIX, "propagated_weights"], blocking=True),
        dg.AssetCheckSpec("fidelity", asset=[PREFIX, "propagated_weights"]),
    ],
)
def propagated_weights(context: dg.AssetExecutionContext, idistill: IdistillResource) -> dg.MaterializeResult:
    """Influence score and weight of every pool sample for this target (KRR propagation for method 'id')."""
    spec = target_spec_for(idistill, context.partition_key)
    start = time.perf_counter()
    result = _score_target(idistill, spec)
    outcome = result["outcome"]
    import polars as pl

    sources = pl.read_parquet(pool_path(idistill), columns=["sample_id", "source"])
    scored = pl.from_arrow(outcome.to_arrow()).join(sources, on="sample_id", how="left", maintain_order="left")
    table = scored.with_columns(pl.col("source").fill_null("")).to_arrow()
    staging = idistill.staging("propagated_weights", spec.name)
    artifacts.write_parquet(staging / "propagated_weights.parquet", table)
    version, folder = idistill.commit(staging)
    path = folder / "propagated_weights.parquet"
    rho = result.get("fidelity")
    weights = outcome.weights
    problems = []
    if not np.isfinite(outcome.scores).all() or not np.isfinite(weights).all():
        problems.append("non-finite scores or weights")
    if (weights < 0).any():
        problems.append("negative weights")
    if not np.isclose(weights.sum(), len(weights), rtol=1e-6):
        problems.append(f"weights sum to {weights.sum():.6g}, expected N={len(weights)}")
    if np.count_nonzero(weights) != len(outcome.selected):
        problems.append(f"{np.count_nonzero(weights)} non-zero weights but {len(outcome.selected)} selected")
    threshold = idistill.settings.fidelity_warn_below
    second = {}
    if "predicted_change" in outcome.details:  # order: second (pipeline.second_order.qp_outcome)
        d = outcome.details
        second = {"second_order_predicted_change": float(d["predicted_change"]),
                  "first_order_predicted_change": float(d["first_order_change"]),
                  "second_order_q_noise": float(d["q_noise"]), "qp_lambda": float(d["lambda"])}
        if d.get("budget_curve"):
            second["budget_curve"] = plots.budget_curve(d["budget_curve"], f"{spec.name}: budget curve", spec.budget)
            second["budget_curve_table"] = plots.table(d["budget_curve"], {
                "k": "int", "fraction": "float", "predicted_change": "float", "first_order_change": "float",
                "lam": "float", "exact": "bool"})
    fidelity_check = dg.AssetCheckResult(
        check_name="fidelity",
        passed=bool(rho is None or (np.isfinite(rho) and rho >= threshold)),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"spearman_rho": float(rho) if rho is not None else -2.0, "threshold": threshold},
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "dagster/row_count": len(outcome.sample_ids),
            "dagster/uri": str(path),
            "method": spec.method,
            "fidelity_spearman": float(rho) if rho is not None else float("nan"),
            "seconds": round(time.perf_counter() - start, 2),
            "score_histogram": plots.histogram(outcome.scores, f"{spec.name}: propagated influence", "score"),
            **{f"seconds_{k}": round(v, 2) for k, v in result.get("timings", {}).items()},
            **second,
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="weights_valid", passed=not problems, metadata={"problems": "; ".join(problems) or "none"}
            ),
            fidelity_check,
        ],
    )


def pool_sources(res: IdistillResource) -> dict[str, str]:
    """Sample id -> pool source of the current pool (what per-source caps count)."""
    import polars as pl

    frame = pl.read_parquet(pool_path(res), columns=["sample_id", "source"])
    return dict(zip(frame["sample_id"].to_list(), frame["source"].to_list(), strict=True))


def _score_target(res: IdistillResource, spec) -> dict:
    """Scores and weights of every pool sample for ``spec.method`` (reads the upstream artefacts)."""

    import torch

    from idistill_core import methods
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.methods.base import SelectionContext
    from idistill_core.methods.exact import exact_outcome
    from idistill_core.methods.id import landmark_outcome

    recipe = target_recipe(res, spec)
    cap = recipe.per_source_cap
    source_of = pool_sources(res) if cap is not None else None
    if spec.method == "id":
        from idistill_core.methods.id import Refinement
        from idistill_core.pipeline.refinement import coefficient_config

        folder = target_dir(res, spec.name, "landmark_influence")
        arrays, meta = artifacts.load_arrays(folder / "landmark_influence.safetensors")
        second = {k[len("second_"):]: v for k, v in arrays.items() if k.startswith("second_")} or None
        refinement = Refinement(list(meta["refine_ids"]), arrays["refine"]) if "refine_ids" in meta else None
        coefficients = load_propagation(res)
        outcome, rho, timings = landmark_outcome(
            coefficients, meta["landmark_ids"], arrays["landmarks"], meta["holdout_ids"], arrays["holdout"],
            spec.budget, recipe, second_order=second, source_of=source_of, refinement=refinement,
            store=embedded_pool(res)[1] if refinement is not None else None,
            propagate=coefficient_config(coefficients, recipe.propagate),
        )
        return {"outcome": outcome, "fidelity": rho, "timings": timings}
    model, tokenizer, pre = gradient_model(res)
    examples = tokenized_pool(res, tokenizer).examples
    if spec.method == "exact":
        grads, _ = artifacts.load_arrays(target_dir(res, spec.name, "target_gradients") / "target_gradients.safetensors")
        outcome = exact_outcome(model, tokenizer, examples, torch.from_numpy(grads["targets"]), spec.budget, recipe, pre, method=spec.method,
                                source_of=source_of)
        return {"outcome": outcome}
    base = res.load_model()
    dev = tokenize_rows(target_rows(spec, "dev"), base.tokenizer, recipe.max_length).examples
    features = None
    if spec.method == "rds":
        # the shared pool features (rds_features); only when that asset has not run for this pool yet does this
        # compute the missing ones, into the same table, so the next rds target finds them
        store, report = fill_rds_features(res, examples)
        if report.computed:
            import logging

            logging.getLogger("idistill").warning(
                "target '%s': computed RDS+ features of %d pool samples that rds_features had not (materialize "
                "rds_features with the shared assets to do this once, up front)", spec.name, report.computed,
            )
        features = store.read(list(examples["sample_id"]))
    ctx = SelectionContext(
        base.model, base.tokenizer, base.fingerprint, examples, dev, spec.budget, recipe, source_of=source_of,
        pool_features=features,
    )
    return {"outcome": methods.get(spec.method).select(ctx).outcome}


def _subset_problems(subset, expected: int, cap: int | None, counts: dict[str, int]) -> list[str]:
    """What the blocking ``subset_valid`` check reports: size against the budget, duplicates, ids the pool lacks,
    the per-source cap."""
    ids = subset["sample_id"].to_list()
    problems = []
    if len(ids) != expected:
        problems.append(f"{len(ids)} rows, budget {expected}")
    if len(set(ids)) != len(ids):
        problems.append("duplicate sample ids")
    if subset["messages"].null_count():
        problems.append("ids missing from the pool")
    if cap is not None and counts and max(counts.values()) > cap:
        problems.append(f"a source has {max(counts.values())} samples, per_source_cap {cap}")
    return problems


def _for_people(value: float) -> float:
    """Four significant digits for a UI table (the files keep full precision)."""
    return float(f"{value:.4g}")


def _subset_previews(subset, weights, pool_rows) -> dict:
    """``top_samples`` (the first 20 by rank) and ``bottom_samples`` (the 5 lowest-scored unselected) tables."""
    import polars as pl

    top = subset.head(20).to_dicts()
    bottom = weights.filter(~pl.col("selected")).sort("score").head(5).join(pool_rows, on="sample_id", how="left")

    def preview(r):
        prompt = r["messages"][0]["content"][:80] if r["messages"] else ""
        return {"sample_id": r["sample_id"], "source": r["source"], "score": _for_people(r["score"]), "prompt": prompt}

    columns = {"sample_id": "string", "source": "string", "score": "float", "prompt": "string"}
    return {
        "top_samples": plots.table([{"rank": r["rank"], **preview(r), "weight": _for_people(r["weight"])} for r in top],
                                   {"rank": "int", **columns, "weight": "float"}),
        "bottom_samples": plots.table([preview(r) for r in bottom.to_dicts()], columns),
    }


@_partitioned(
    "selected_subset",
    [propagated_weights, pool],
    {"parquet"},
    "subset-v2",
    check_specs=[dg.AssetCheckSpec("subset_valid", asset=[PREFIX, "selected_subset"], blocking=True)],
)
def selected_subset(context: dg.AssetExecutionContext, idistill: IdistillResource) -> dg.MaterializeResult:
    """The budgeted subset (parquet and jsonl rows in the chat schema, with a ``weight`` column) and its hand-off:
    a Hugging Face dataset folder (``export/``) whose card holds the provenance (docs/handoff.md)."""
    import polars as pl

    from idistill_assets import handoff
    from idistill_core.project.targets import selection_cap

    spec = target_spec_for(idistill, context.partition_key)
    weights = pl.read_parquet(target_dir(idistill, spec.name, "propagated_weights") / "propagated_weights.parquet")
    pool_rows = pl.read_parquet(pool_path(idistill))
    chosen = weights.filter(pl.col("selected")).select("sample_id", "weight", "score", "rank")
    subset = chosen.join(pool_rows, on="sample_id", how="left").sort("rank")
    staging = idistill.staging("selected_subset", spec.name)
    subset.write_parquet(staging / "subset.parquet")
    subset.write_ndjson(staging / "subset.jsonl")
    counts, pool_counts = source_counts(subset), source_counts(pool_rows)
    cap = selection_cap(spec, idistill.settings.recipe.per_source_cap)
    problems = _subset_problems(subset, min(spec.budget, len(weights)), cap, counts)
    fields, landmarks = handoff.provenance(idistill, pool_rows.to_arrow(), uses_landmarks=spec.method == "id")
    fields.update(
        kind="target", name=spec.name, budget=spec.budget,
        method={"name": spec.method, "order": spec.order, "aggregate": spec.aggregate},
        fidelity_spearman=handoff.latest_metadata(context, "propagated_weights", spec.name, "fidelity_spearman"),
    )
    version, folder, card = handoff.publish(idistill, staging, subset, fields, landmarks, pool_counts, not problems)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "dagster/row_count": subset.height,
            "dagster/column_schema": plots.column_schema(subset.schema, SUBSET_COLUMNS),
            "dagster/uri": str(folder / "subset.parquet"),
            **handoff.card_metadata(card),
            "budget": spec.budget,
            "per_source_cap": cap if cap is not None else "none",
            **plots.source_composition(counts, pool_counts, f"{spec.name}: selected subset by source"),
            "weight_histogram": plots.histogram(subset["weight"].to_list(), f"{spec.name}: weights of selected", "weight"),
            **_subset_previews(subset, weights, pool_rows),
            **{f"share_{k}": round(v / subset.height, 4) for k, v in counts.items()},
        },
        check_results=[
            dg.AssetCheckResult(check_name="subset_valid", passed=not problems, metadata={"problems": "; ".join(problems) or "none"})
        ],
    )
