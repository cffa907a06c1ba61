"""The main job: materialize every asset for every registered target (and every mix over them), then print a
per-target summary.

    python -m idistill_assets.main [--profile profiles/default.yaml] [--targets arith,reading]

Runs go into a project-local Dagster instance (``<home>/dagster_home``, sqlite), so ``dagster dev`` afterwards
shows the same runs, lineage and metadata in the UI. Targets whose YAML says ``finetune: false`` get the
selection assets; fine-tune and eval record a skip with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _instance(settings):
    """The project's instance: dagster.yaml (run queue and pools sized to the devices) and the pool limits."""
    import dagster as dg

    from idistill_assets.resources import configure_instance, write_instance_config

    dagster_home = settings.home / "dagster_home"
    write_instance_config(dagster_home, settings)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    instance = dg.DagsterInstance.get()
    configure_instance(instance, settings)
    return instance


def _metadata(instance, key: list[str], partition: str | None, name: str):
    """A metadata value of the latest materialization of ``key`` (in ``partition``), or None."""
    import dagster as dg

    records_filter = dg.AssetRecordsFilter(
        asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None
    )
    records = instance.fetch_materializations(records_filter, limit=1).records
    if not records or records[0].asset_materialization is None:
        return None
    value = records[0].asset_materialization.metadata.get(name)
    return getattr(value, "value", value)


def print_summary(instance, settings, profile: str, registry: dict, names: list[str], timings: dict, failed: list[str]):
    """One screen: the shared stage, then per target subset size, fidelity and eval of base / ID / random."""
    print("\n" + "=" * 100)
    print(f"idistill main job — profile {profile}, model {settings.model}, home {settings.home}")
    pool_rows = _metadata(instance, ["idistill", "pool"], None, "dagster/row_count")
    emb_seconds = _metadata(instance, ["idistill", "embeddings"], None, "seconds")
    lm_seconds = _metadata(instance, ["idistill", "landmarks"], None, "seconds")
    print(f"pool: {pool_rows} samples; embeddings {emb_seconds} s; landmark gradients {lm_seconds} s; shared stage {timings['shared']:.0f} s")
    precision = _metadata(instance, ["idistill", "embeddings"], None, "precision")
    if precision is not None:
        print(f"precision (embeddings, from the materialization's metadata): {precision}")
    header = f"{'target':<10} {'metric':<10} {'k':>4} {'fidelity ρ':>10} {'base':>8} {'ID':>8} {'random':>8} {'ID top source share':<28} {'time':>6}"
    print(header)
    print("-" * len(header))
    from idistill_assets.resources import IdistillResource

    res = IdistillResource(profile=profile, home=str(settings.home))
    for name in names:
        spec = registry[name]
        size = _metadata(instance, ["idistill", "selected_subset"], name, "dagster/row_count")
        rho = _metadata(instance, ["idistill", "propagated_weights"], name, "fidelity_spearman")
        scores = {"base": "-", "influence_distillation": "-", "random": "-"}
        eval_uri = _metadata(instance, ["idistill", "eval_scores"], name, "dagster/uri")
        if spec.finetune and spec.evaluate and eval_uri and Path(eval_uri).exists():
            eval_file = Path(eval_uri)
            for row in json.loads(eval_file.read_text())["rows"]:
                scores[row["model"]] = f"{row['score']:.3f}"
        shares = {}
        if size:
            import polars as pl

            subset = pl.read_parquet(res.current("selected_subset", name) / "subset.parquet")
            counts = subset["source"].value_counts().sort("count", descending=True).head(1).to_dicts()
            shares = {c["source"]: c["count"] / subset.height for c in counts}
        top = ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
        rho_text = f"{rho:.3f}" if isinstance(rho, float) else "-"
        status = " FAILED" if name in failed else ""
        print(
            f"{name:<10} {spec.metric:<10} {size or 0:>4} {rho_text:>10} {scores['base']:>8} "
            f"{scores['influence_distillation']:>8} {scores['random']:>8} {top:<28} {timings[name]:>5.0f}s{status}"
        )


def _committed_rows(settings) -> int:
    """Rows in the embeddings table (what a re-run resumes from); 0 when there is none yet."""
    try:
        import lancedb

        db = lancedb.connect(str(settings.lancedb_uri))
        return int(db.open_table(settings.embeddings_table).count_rows())
    except Exception:  # noqa: BLE001 - no folder or no table yet: nothing committed
        return 0


def _was_interrupted(result) -> bool:
    """Dagster turns SIGINT in a step into a DagsterExecutionInterruptedError step failure."""
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            while error is not None:
                if error.cls_name in ("DagsterExecutionInterruptedError", "KeyboardInterrupt", "Interrupted"):
                    return True
                error = error.cause
    return False


def main(argv: list[str] | None = None) -> int:
    """Run the main job; Ctrl-C / SIGTERM end it with one line and status 130 / 143 (committed work kept)."""
    import signal

    def on_signal(signum, frame):
        raise KeyboardInterrupt  # what Dagster knows how to unwind a step with

    # Dagster maps SIGTERM onto its own SIGINT handler during a run, so the wakeup fd (written by the
    # interpreter for every signal, whoever handles it) is how we learn which one arrived.
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    holder: dict = {}
    try:
        code = _main(argv, holder)
    except KeyboardInterrupt:
        code = None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(previous_fd)
        try:
            received = [n for n in os.read(read_end, 1024) if n in (signal.SIGINT, signal.SIGTERM)]
        except BlockingIOError:
            received = []
        os.close(read_end)
        os.close(write_end)
    if code is None or (received and code != 0):
        signum = received[0] if received else signal.SIGINT
        rows = _committed_rows(holder["settings"]) if "settings" in holder else 0
        print(
            f"idistill: interrupted ({signal.Signals(signum).name}); {rows} rows committed, re-run to resume",
            file=sys.stderr,
        )
        return 128 + signum
    return code


def _main(argv: list[str] | None, holder: dict) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=os.environ.get("IDISTILL_PROFILE", "profiles/default.yaml"))
    parser.add_argument("--home", default=None, help="override the profile's home folder")
    parser.add_argument("--targets", default=None, help="comma-separated subset of the registered targets")
    args = parser.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from idistill_assets.definitions import build_definitions
    from idistill_assets.partitions import targets as targets_partitions
    from idistill_core.project.settings import load_settings
    from idistill_core.project.targets import load_registry

    settings = load_settings(args.profile, args.home)
    holder["settings"] = settings
    instance = _instance(settings)
    defs = build_definitions(args.profile, str(settings.home))
    started = time.perf_counter()
    timings: dict[str, float] = {}

    step = time.perf_counter()
    result = defs.resolve_job_def("shared_job").execute_in_process(instance=instance, raise_on_error=False)
    timings["shared"] = time.perf_counter() - step
    if _was_interrupted(result):
        raise KeyboardInterrupt
    if not result.success:
        print("shared assets failed; see the log above", file=sys.stderr)
        return 1

    registry = load_registry(settings.targets_dir, settings.data_roots)
    names = [n for n in registry if args.targets is None or n in args.targets.split(",")]
    known = set(instance.get_dynamic_partitions(targets_partitions.name))
    instance.add_dynamic_partitions(targets_partitions.name, [n for n in names if n not in known])
    failed = []
    for name in names:
        job = "target_job"  # fine-tune and eval skip themselves, with the reason, for targets that opt out
        step = time.perf_counter()
        run = defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=name, raise_on_error=False)
        timings[name] = time.perf_counter() - step
        if _was_interrupted(run):
            raise KeyboardInterrupt
        if not run.success:
            failed.append(name)

    mixes_failed = _run_mixes(defs, instance, settings, registry, [n for n in names if n not in failed], timings)

    print_summary(instance, settings, args.profile, registry, names, timings, failed)
    for mix, split in timings.pop("_mixes", {}).items():
        print(f"mix {mix}: {split}" + (" FAILED" if mix in mixes_failed else ""))
    total = time.perf_counter() - started
    print(f"total wall time {total:.0f} s ({total / 60:.1f} min). Open the UI with: make ui")
    print("=" * 100)
    return 1 if failed or mixes_failed else 0


def _run_mixes(defs, instance, settings, registry: dict, built: list[str], timings: dict) -> list[str]:
    """Materialize every mix whose targets were all built in this run (a mix only re-reads their scores, so
    this adds seconds). Records ``timings['_mixes'] = {mix: budget split or reason}``; returns failed mixes."""
    from idistill_assets.partitions import mixes as mixes_partitions
    from idistill_core.project.mixes import load_mixes

    specs = load_mixes(settings.targets_dir, registry)
    ready = [m for m, spec in specs.items() if set(spec.targets) <= set(built)]
    known = set(instance.get_dynamic_partitions(mixes_partitions.name))
    instance.add_dynamic_partitions(mixes_partitions.name, [m for m in ready if m not in known])
    report, failed = {}, []
    for mix in specs:
        if mix not in ready:
            report[mix] = "skipped (not all of its targets were built in this run)"
            continue
        step = time.perf_counter()
        run = defs.resolve_job_def("mix_job").execute_in_process(instance=instance, partition_key=mix, raise_on_error=False)
        if _was_interrupted(run):
            raise KeyboardInterrupt
        split = _metadata(instance, ["idistill", "mixed_subset"], mix, "budget_split")
        report[mix] = f"{split} ({time.perf_counter() - step:.1f} s)" if run.success else "see the log above"
        if not run.success:
            failed.append(mix)
    timings["_mixes"] = report
    return failed


if __name__ == "__main__":
    sys.exit(main())
