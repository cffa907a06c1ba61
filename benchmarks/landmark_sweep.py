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
) -> dict[str, Any]:
    """Child side: ρ, top-10% overlap and time for every landmark count."""
    from benchmarks import workload
    from idistill_core.pipeline import propagate_scores

    work = workload.load(
        model, device, work_dir, pool_size, targets, max_length, embed, gradients, propagate, seed
    )
    holdout, order = workload.split(work, num_holdout)
    largest = max(landmarks)
    if largest > len(order):
        raise ValueError(
            f"landmark_sweep: L={largest} needs a pool of at least {largest + num_holdout} samples"
        )
    store, store_info = workload.embedded_store(work)
    target_grads, _ = workload.target_gradients(work)
    g_holdout, _, _ = workload.exact_gradients(work, work.pool, holdout)
    g_all, seconds, computed = workload.exact_gradients(work, work.pool, order[:largest])
    ho_exact = workload.influence(g_holdout, target_grads)
    values_all = workload.influence(g_all, target_grads)
    rows = []
    for count in landmarks:
        start = time.perf_counter()
        ids, scores, _ = propagate_scores(store, order[:count], values_all[:count], work.recipe.propagate)
        propagate_s = time.perf_counter() - start
        position = {s: i for i, s in enumerate(ids)}
        agreement = workload.rank_agreement(scores[[position[s] for s in holdout]], ho_exact)
        gradient_s = float(seconds[:count].sum())
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
        "targets": list(target_grads),
        "pool_n": len(work.pool),
        "num_holdout": len(holdout),
        "gradients_computed_here": computed,
        "store": store_info,
    }


def run(params: dict[str, Any], results_dir: Path, work_dir: Path, profile: str, machine: dict) -> dict:
    start = time.perf_counter()
    child = run_child(NAME, "measure", {**params, "work_dir": str(work_dir)})
    rows = child["rows"]
    figures = {
        "spearman_vs_exact_by_L": {str(r["L"]): r["spearman_mean"] for r in rows},
        "top10_overlap_by_L": {str(r["L"]): r["top10_overlap_mean"] for r in rows},
        "seconds_by_L": {str(r["L"]): r["total_s"] for r in rows},
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
