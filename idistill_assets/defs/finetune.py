"""Per-target fine-tuning on the selected subset (and on a random subset of the same size), and evaluation."""


import copy
import time

import dagster as dg
import numpy as np

from idistill_assets import plots
from idistill_assets.defs.shared import PREFIX, base_model, pool
from idistill_assets.defs.targets import (
    _partitioned,
    selected_subset,
    target_dir,
    target_rows,
    target_spec,
    target_spec_for,
)
from idistill_assets.resources import DEVICE_POOL, IdistillResource
from idistill_assets.upstream import load_pool_rows
from idistill_core.store import artifacts
from idistill_core.store.hashing import config_fingerprint, ids_hash, stable_hash


def checkpoint_path(res: IdistillResource, target: str, asset: str) -> str:
    """The checkpoint directory the latest materialization of ``asset`` (a checkpoint asset) trained."""
    return artifacts.read_json(target_dir(res, target, asset) / "checkpoint.json")["path"]


def _train_on(
    context, res: IdistillResource, ids: list[str], name: str, spec, subset_card_id: str | None = None
) -> dg.MaterializeResult:
    """Fine-tune a fresh copy of the base model on pool rows ``ids``; checkpoint path = target + data version.
    ``subset_card_id``: the card id of the exported subset the ids came from (recorded for the eval's lineage)."""
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.training.finetune import finetune

    s = res.settings
    base = res.load_model()
    rows = load_pool_rows(res)
    position = {sample_id: i for i, sample_id in enumerate(rows["sample_id"])}
    subset = rows.select([position[i] for i in ids])
    examples = tokenize_rows(subset, base.tokenizer, s.recipe.max_length).examples
    version = stable_hash({"ids": ids_hash(ids), "model": base.fingerprint, "recipe": config_fingerprint(s.finetune)}, 16)
    # keyed by data version, not target: an identical subset (e.g. the same-size random baseline of every
    # target) trains once and is reused
    out = res.artifact_dir("checkpoints") / f"{name}-{version}"
    model = copy.deepcopy(base.model)
    model.train()
    start = time.perf_counter()
    result = finetune(model, base.tokenizer, examples, s.finetune, out_dir=out, log_every=5)
    context.log.info(
        "%s/%s: %d steps, final loss %.4f, %.1f s%s", spec.name, name, result.steps,
        result.losses[-1] if result.losses else float("nan"), time.perf_counter() - start,
        " (reused cached checkpoint)" if result.cached else "",
    )
    staging = res.staging(f"{name}_checkpoint" if name == "random" else "finetuned_checkpoint", spec.name)
    record = {"path": str(out), "version": version, **({"subset_card_id": subset_card_id} if subset_card_id else {})}
    artifacts.write_json(staging / "checkpoint.json", record)
    res.commit(staging, version)
    losses = result.losses or [float("nan")]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "dagster/uri": str(out),
            **({"subset_card_id": subset_card_id} if subset_card_id else {}),
            "train_samples": len(examples),
            "steps": result.steps,
            "tokens": result.tokens,
            "seconds": round(result.seconds, 2),
            "reused": result.cached,
            "first_loss": float(losses[0]),
            "final_loss": float(losses[-1]),
            "loss_curve": plots.line(losses, f"{spec.name}: {name} loss", "step", "train loss"),
            # the curve above is the trainer's log history (TRL SFTTrainer, one entry per optimizer step)
            "trainer": f"trl {result.extra.get('trl', '?')}",
            "train_precision": str(result.extra.get("precision", s.finetune.precision)),
            "precision": s.finetune.precision if s.finetune.precision != "auto"
            else "auto -> " + res.precision("auto").summary(),
        },
    )


def subset_card_id(res: IdistillResource, target: str) -> str | None:
    """The card id of the exported subset the current ``finetuned_checkpoint`` trained on (None before exports)."""
    return artifacts.read_json(target_dir(res, target, "finetuned_checkpoint") / "checkpoint.json").get("subset_card_id")


def skip_reason(spec, asset: str) -> str | None:
    """Why ``asset`` does not apply to this target (its YAML opted out), or None."""
    if not spec.finetune:
        return f"target '{spec.name}' sets finetune: false in {spec.source_file}"
    if asset == "eval_scores" and not spec.evaluate:
        return f"target '{spec.name}' sets evaluate: false in {spec.source_file}"
    return None


def skipped(context: dg.AssetExecutionContext, reason: str):
    """A visible skip: no materialization (downstream steps are skipped too), an observation and a log line
    carrying the reason, shown in the asset's event list and the run's log in the UI."""
    context.log.info("skipped: %s", reason)
    yield dg.AssetObservation(
        asset_key=context.asset_key, partition=context.partition_key, metadata={"skipped": reason}
    )


def _opt_out_aware(name: str, deps: list, version: str, **kwargs):
    return _partitioned(name, deps, {"pytorch", "safetensors"} if name != "eval_scores" else {"pytorch"}, version,
                        output_required=False, pool=DEVICE_POOL, **kwargs)


@_opt_out_aware("finetuned_checkpoint", [selected_subset, base_model], "finetune-v1")
def finetuned_checkpoint(context: dg.AssetExecutionContext, idistill: IdistillResource):
    """The base model fine-tuned on this target's selected subset (a standard HF directory)."""
    import polars as pl

    spec = target_spec_for(idistill, context.partition_key)
    if reason := skip_reason(spec, "finetuned_checkpoint"):
        yield from skipped(context, reason)
        return
    from idistill_assets.handoff import card_id_of

    folder = target_dir(idistill, spec.name, "selected_subset")
    subset = pl.read_parquet(folder / "subset.parquet")
    yield _train_on(context, idistill, subset["sample_id"].to_list(), "selected", spec, card_id_of(folder))


@_opt_out_aware("random_checkpoint", [selected_subset, pool, base_model], "finetune-v1")
def random_checkpoint(context: dg.AssetExecutionContext, idistill: IdistillResource):
    """The baseline: the same recipe on a uniformly random pool subset of the same size (seeded)."""
    import polars as pl

    spec = target_spec_for(idistill, context.partition_key)
    if reason := skip_reason(spec, "random_checkpoint"):
        yield from skipped(context, reason)
        return
    size = pl.read_parquet(target_dir(idistill, spec.name, "selected_subset") / "subset.parquet").height
    ids = sorted(load_pool_rows(idistill)["sample_id"])
    rng = np.random.default_rng(idistill.settings.finetune.seed)
    picked = [ids[i] for i in rng.choice(len(ids), size=size, replace=False)]
    yield _train_on(context, idistill, picked, "random", spec)


def _score_models(context, res: IdistillResource, spec, rows, config) -> tuple[dict, dict, dict]:
    """(results, seconds, lm-eval results) of the base, ID-tuned and random-tuned models on the test rows."""
    from idistill_core.models.loading import load_model
    from idistill_core.training.evaluate import evaluate

    base = res.load_model()
    models = {
        "base": lambda: base.model,
        "influence_distillation": lambda: load_model(checkpoint_path(res, spec.name, "finetuned_checkpoint")).model,
        "random": lambda: load_model(checkpoint_path(res, spec.name, "random_checkpoint")).model,
    }
    results, seconds = {}, {}
    for number, (name, get) in enumerate(models.items(), start=1):
        start = time.perf_counter()
        results[name] = result = evaluate(get(), base.tokenizer, rows, spec.metric, config)
        seconds[name] = time.perf_counter() - start
        context.log.info("eval %d/%d %s %s: %s = %.4f on %d (%.1f s)", number, len(models), spec.name, name,
                         spec.metric, result.score, result.n, seconds[name])
    harness = {}
    if spec.lm_eval:  # the harness's own numbers beside ours, same models and test rows
        from idistill_core.training.evaluate import evaluate_lm_eval

        for name, get in models.items():
            harness[name] = evaluate_lm_eval(get(), base.tokenizer, rows, spec.lm_eval, config)
    return results, seconds, harness


def _scores_table(table: list[dict]) -> dg.MetadataValue:
    """The scores as a typed UI table, floats to four significant digits (the JSON file keeps them whole)."""
    columns = sorted({k for row in table for k in row}, key=lambda k: (k != "model", k != "subset", k != "score", k))
    kinds = {c: "string" if c in ("model", "subset") else ("int" if all(isinstance(r.get(c), int) for r in table) else "float")
             for c in columns}
    shown = [{k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()} for row in table]
    return plots.table(shown, kinds)


def _harness_metadata(harness: dict) -> dict:
    if not harness:
        return {}
    first = next(iter(harness.values()))
    return {
        "lm_eval_version": first["lm_eval_version"],
        "lm_eval_task_config": dg.MetadataValue.json(first["task_config"]),
        "lm_eval_results": dg.MetadataValue.json({k: h["results"] for k, h in harness.items()}),
    }


@_opt_out_aware(
    "eval_scores",
    [finetuned_checkpoint, random_checkpoint, target_spec, base_model],
    "eval-v1",
    check_specs=[dg.AssetCheckSpec("id_beats_random", asset=[PREFIX, "eval_scores"])],
)
def eval_scores(context: dg.AssetExecutionContext, idistill: IdistillResource):
    """Target metric on the test set for the base model, the ID-tuned model and the random-tuned model, beside the
    card id of the exported subset the ID-tuned model trained on."""
    from idistill_core.training.evaluate import EvalConfig, paired_gap

    s = idistill.settings
    spec = target_spec_for(idistill, context.partition_key)
    if reason := skip_reason(spec, "eval_scores"):
        yield from skipped(context, reason)
        return
    rows = target_rows(spec, "test")
    rows = rows.select(range(min(len(rows), s.eval.max_test)))
    config = EvalConfig(max_new_tokens=s.eval.max_new_tokens, batch_size=s.eval.batch_size)
    results, seconds, harness = _score_models(context, idistill, spec, rows, config)
    card_id = subset_card_id(idistill, spec.name)
    trained_on = {"base": "none", "influence_distillation": card_id or "unknown", "random": "random, same size"}
    table = [
        {
            "model": name,
            "subset": trained_on[name],
            "score": r.score,
            "n": r.n,
            **{k: v for k, v in r.details.items() if isinstance(v, (int, float))},
            "seconds": round(seconds[name], 1),
        }
        for name, r in results.items()
    ]
    staging = idistill.staging("eval_scores", spec.name)
    artifacts.write_json(staging / "eval_scores.json", {"target": spec.name, "metric": spec.metric, "rows": table,
                                                        "lm_eval": harness, "subset_card_id": card_id})
    version, folder = idistill.commit(staging)
    id_score, random_score = results["influence_distillation"].score, results["random"].score
    beats = id_score < random_score if spec.metric == "nll" else id_score > random_score  # nll: lower is better
    gap = paired_gap(results["influence_distillation"], results["random"])
    noise = {"id_minus_random": gap["mean"], "id_minus_random_ci95_low": gap["ci95_low"],
             "id_minus_random_ci95_high": gap["ci95_high"], "gap_within_noise": gap["within_noise"]}
    yield dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "dagster/uri": str(folder / "eval_scores.json"),
            "metric": spec.metric,
            "subset_card_id": card_id or "unknown",
            "test_samples": results["base"].n,
            "scores": _scores_table(table),
            "comparison": plots.bars({k: r.score for k, r in results.items()}, f"{spec.name}: {spec.metric}", spec.metric),
            **{f"score_{k}": float(r.score) for k, r in results.items()},
            **_harness_metadata(harness),
            "precision": str(results["base"].details.get("precision", "")),
            **noise,
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="id_beats_random",
                passed=bool(beats),
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"influence_distillation": float(id_score), "random": float(random_score), **noise},
            )
        ],
    )
