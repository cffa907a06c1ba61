"""Benchmark 3: fidelity against exact influence as the number of landmarks grows (paper Figure 3 left).

For each L the landmarks are the first L of one seeded order (so a smaller set is a subset of a larger one),
the kernel ridge is refitted and ρ is measured on the same held-out pool samples as in benchmark 2.
Time per setting = the measured gradient seconds of those L landmarks (rows of the per-run gradient cache,
each timed when it was computed, possibly by benchmark 2) + the measured fit-and-propagate time over the pool.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import print_table, run_child, write_result

NAME = "landmark_sweep"


def measure(
    model: str,
    device: str,
    work_dir: str,
    pool_size: int,
    landmarks: list[int],
    num_holdout: int,
    targets: list[str],
    max_length: int,
    embed: dict,
    gradients: dict,
    propagate: dict,
    seed: int = 0,
    target_examples: int | None = None,
    time_budget_s: float | None = None,
) -> dict[str, Any]:
    """Child side: ρ, top-10% overlap and time for every landmark count that fits.

    Pool, held-out samples and gradients come from end_to_end when it ran first in this run. With
    ``time_budget_s``, a landmark count is skipped (and reported as skipped) when its missing gradients would
    not fit the time left at the median measured gradient rate.
    """
    from benchmarks import workload
    from idistill_core.pipeline.propagation import propagate_scores

    began = time.perf_counter()
    work = workload.load(
        model,
        device,
        work_dir,
        pool_size,
        targets,
        max_length,
        embed,
        gradients,
        propagate,
        seed,
        target_examples,
    )
    store, store_info = workload.embedded_store(work, None if time_budget_s is None else 0.3 * time_budget_s)
    num_holdout = store_info.get("num_holdout", num_holdout)
    holdout, order = workload.split(store_info["ids"], num_holdout)
    target_grads, _ = workload.target_gradients(work)
    g_holdout, seconds_holdout, computed = workload.exact_gradients(work, work.pool, holdout)
    rate = float(np.median(seconds_holdout))
    rows, skipped = [], []
    for count in sorted(landmarks):
        if count > len(order):
            skipped.append({"L": count, "why": f"pool of {len(order)} non-held-out samples is too small"})
            continue
        _, _, missing = workload.exact_gradients(
            work, work.pool, order[:count], read_cache=True, dry_run=True
        )
        if time_budget_s is not None and missing * rate > time_budget_s - (time.perf_counter() - began):
            skipped.append({"L": count, "why": f"{missing} more gradients would not fit the time budget"})
            continue
        g_landmarks, seconds, new = workload.exact_gradients(work, work.pool, order[:count])
        computed += new
        values = workload.influence(g_landmarks, target_grads)
        ho_exact = workload.influence(g_holdout, target_grads)
        start = time.perf_counter()
        ids, scores, _ = propagate_scores(store, store_info["ids"], order[:count], values, work.recipe.propagate)
        propagate_s = time.perf_counter() - start
        position = {s: i for i, s in enumerate(ids)}
        agreement = workload.rank_agreement(scores[[position[s] for s in holdout]], ho_exact)
        gradient_s = float(seconds.sum())
        rows.append(
            {
                "L": count,
                "spearman_mean": float(np.mean(agreement["spearman"])),
                "spearman_per_target": agreement["spearman"],
                "top10_overlap_mean": float(np.mean(agreement["top_overlap"])),
                "landmark_gradient_s": gradient_s,
                "propagation_s": propagate_s,
                "total_s": gradient_s + propagate_s,
            }
        )
        print(f"landmark_sweep: L={count} rho={rows[-1]['spearman_mean']:.3f}", flush=True)
    return {
        "rows": rows,
        "skipped": skipped,
        "targets": list(target_grads),
        "pool_n": len(store_info["ids"]),
        "num_holdout": len(holdout),
        "gradients_computed_here": computed,
        "store": {k: v for k, v in store_info.items() if k != "ids"},
    }


def run(params: dict[str, Any], results_dir: Path, work_dir: Path, profile: str, machine: dict) -> dict:
    start = time.perf_counter()
    child = run_child(NAME, "measure", {**params, "work_dir": str(work_dir)})
    rows = child["rows"]
    figures = {
        "spearman_vs_exact_by_L": {str(r["L"]): r["spearman_mean"] for r in rows},
        "top10_overlap_by_L": {str(r["L"]): r["top10_overlap_mean"] for r in rows},
        "seconds_by_L": {str(r["L"]): r["total_s"] for r in rows},
        "skipped_L": [r["L"] for r in child["skipped"]],
        "smallest_L_with_spearman_0_9": next((r["L"] for r in rows if r["spearman_mean"] >= 0.9), None),
        "peak_rss_gib": child["peak_rss_gib"],
    }
    notes = [
        (
            f"pool N={child['pool_n']}, rho on {child['num_holdout']} held-out samples (never landmarks), mean "
            f"over targets {', '.join(child['targets'])}"
        ),
        (
            "landmark_gradient_s sums per-sample gradient times measured when each landmark's gradient was "
            f"computed ({child['gradients_computed_here']} computed in this benchmark, the rest reused from "
            "end_to_end)"
        ),
        (
            "embeddings reused from end_to_end"
            if child["store"].get("reused")
            else f"embeddings computed here in {child['store']['seconds']:.1f} s (not part of the per-L time)"
        ),
        *[f"L={r['L']} skipped: {r['why']}" for r in child["skipped"]],
    ]
    print_table(
        f"[3] landmark sweep ({params['model']}, N={child['pool_n']})",
        [
            {
                "L": r["L"],
                "spearman": r["spearman_mean"],
                "top-10% overlap": r["top10_overlap_mean"],
                "landmark grads s": r["landmark_gradient_s"],
                "propagation s": r["propagation_s"],
                "total s": r["total_s"],
            }
            for r in rows
        ],
    )
    write_result(
        results_dir, NAME, profile, params, figures, rows, notes, machine, time.perf_counter() - start
    )
    return figures
