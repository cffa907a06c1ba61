"""Run one idistill job in a fresh process, so a test can SIGKILL it or run two at once.

    python -m tests.reliability.jobrunner --profile P --job shared_job [--partition arith]
        [--dagster-home DIR] [--progress FILE] [--slow SECONDS] [--result FILE] [--barrier DIR --parties N]

``--progress`` appends one line per committed chunk (``emb <rows>`` after a LanceDB commit, ``lm <shard>`` after
a landmark-gradient shard), written after the commit, so a reader knows what is on disk. ``--slow`` sleeps before
each commit, which widens the window in which a kill lands between computing a chunk and committing it.
``--barrier``: wait until ``--parties`` runners are ready (one file each in DIR) before executing, so concurrent
runs really overlap; the result file records the wall-clock start and end of the execution.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path


def instrument(progress: Path | None, slow: float) -> None:
    from idistill_core.store import artifacts
    from idistill_core.store.lance import EmbeddingStore

    def log(line: str) -> None:
        if progress is not None:
            with open(progress, "a") as handle:
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    insert = EmbeddingStore.insert_missing

    def insert_missing(self, sample_ids, vectors, retries=5):
        time.sleep(slow)
        inserted = insert(self, sample_ids, vectors, retries)
        log(f"emb {inserted}")
        return inserted

    save = artifacts.save_arrays

    def save_arrays(path, arrays, metadata=None):
        if Path(path).name.startswith("chunk-"):
            time.sleep(slow)
        save(path, arrays, metadata)
        if Path(path).name.startswith("chunk-"):
            log(f"lm {Path(path).name}")

    EmbeddingStore.insert_missing = insert_missing
    artifacts.save_arrays = save_arrays


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", required=True)
    parser.add_argument("--job", default="shared_job")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--dagster-home", default=None)
    parser.add_argument("--progress", default=None)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--result", default=None)
    parser.add_argument("--barrier", default=None)
    parser.add_argument("--parties", type=int, default=1)
    args = parser.parse_args()

    import dagster as dg

    from idistill_assets.definitions import build_definitions

    instrument(Path(args.progress) if args.progress else None, args.slow)
    defs = build_definitions(args.profile)
    if args.dagster_home:
        os.environ["DAGSTER_HOME"] = args.dagster_home
        instance = dg.DagsterInstance.get()
    else:
        instance = dg.DagsterInstance.ephemeral()
    if args.partition and args.partition not in instance.get_dynamic_partitions("targets"):
        instance.add_dynamic_partitions("targets", [args.partition])
    if args.barrier:
        barrier = Path(args.barrier)
        barrier.mkdir(parents=True, exist_ok=True)
        (barrier / f"{os.getpid()}.ready").touch()
        while len(list(barrier.glob("*.ready"))) < args.parties:
            time.sleep(0.01)
    started = time.time()
    result = defs.resolve_job_def(args.job).execute_in_process(
        instance=instance, partition_key=args.partition, raise_on_error=False
    )
    finished = time.time()
    errors = []
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            while error is not None:
                errors.append(error.message.strip())
                error = error.cause
    if args.result:
        Path(args.result).write_text(
            json.dumps(
                {"success": result.success, "errors": errors, "started": started, "finished": finished}
            )
        )
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
