"""Raw gradient norms per task of the real benchmark's pool: why a norm-weighted linear term (the second order's
``‖g_i‖ (u_i · g_T)``) ranks short-answer rows first.

The default model's unprojected, unnormalised ``down_proj`` gradient (float32) of the first ``--rows`` rows of each
task; the median norm per task. Run: ``OMP_NUM_THREADS=1 python -m benchmarks.studies.gradient_norms`` (after
``benchmarks.quality.features``); writes ``benchmarks/results/gradient_norms.json``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS_DIR, machine_info, print_table, utc_now, write_json_atomic
from benchmarks.quality.run import live_setup

TASKS = ("math", "gsm8k_cot", "mbpp", "xsum", "squad", "arc", "boolq", "quartz", "csqa", "sst2")


def main(argv: list[str] | None = None) -> int:
    from idistill_core.pipeline.gradients import compute_gradients

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(".idistill/quality"))
    parser.add_argument("--data", type=Path, default=Path(".idistill/realdata"))
    parser.add_argument("--rows", type=int, default=4)
    args = parser.parse_args(argv)
    live = live_setup(args.work, args.data)
    by_source = collections.defaultdict(list)
    for sample_id, source in live.source_of.items():
        by_source[source].append(sample_id)
    picked = [s for task in TASKS for s in by_source[task][: args.rows]]
    config = dataclasses.replace(live.settings.recipe.gradients, normalize=False, proj_dim=None, dtype="float32")
    got = compute_gradients(live.loaded.model, live.loaded.tokenizer, live.pool, picked, config)
    norms = collections.defaultdict(list)
    for sample_id, grad in zip(got.sample_ids, got.grads, strict=True):
        norms[live.source_of[sample_id]].append(float(grad.norm()))
    rows = [{"task": t, "median_norm": float(np.median(norms[t])), "min": min(norms[t]), "max": max(norms[t])}
            for t in TASKS]
    print_table("raw down_proj gradient norm per task (default model)", rows)
    write_json_atomic(RESULTS_DIR / "gradient_norms.json", {
        "rows": rows, "per_task_rows": args.rows, "machine": machine_info(), "finished_utc": utc_now()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
