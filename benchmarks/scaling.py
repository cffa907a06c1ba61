"""Benchmark 4: time per stage and peak RSS as the pool grows (issue 7 item 4).

One child process per pool size runs the whole ID selection through the pipeline functions: tokenize, JVP
embeddings into a fresh LanceDB table, landmark and target gradients (fixed L), propagation streaming the
table in chunks, and top-k selection. Goal: per-sample time flat in N (time linear in N) and peak RSS of the
largest pool within 1.2× of the smallest (nothing of size N × D is held in memory).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import Stopwatch, builtin_data, print_table, run_child, write_result

NAME = "scaling"
STAGES = ("tokenize", "embeddings", "landmark_gradients", "target_gradients", "propagation", "selection")


def measure(
    model: str,
    device: str,
    work_dir: str,
    data_dir: str,
    pool_size: int,
    num_landmarks: int,
    target: str,
    max_length: int,
    budget_fraction: float,
    embed: dict,
    gradients: dict,
    propagate: dict,
    seed: int = 0,
) -> dict[str, Any]:
    """Child side: stage times for one pool size (peak RSS is added by the parent from wait4)."""
    from benchmarks.common import bench_recipe, load_bench_model, tokenized
    from idistill_core.pipeline.embeddings import embed_pool, open_store
    from idistill_core.pipeline.gradients import compute_gradients
    from idistill_core.pipeline.landmarks import choose_landmarks
    from idistill_core.pipeline.propagation import propagate_scores
    from idistill_core.pipeline.selection import select_samples
    from idistill_core.steps.influence import landmark_values

    watch = Stopwatch(device)
    net, tokenizer, fingerprint = load_bench_model(model, device, seed)
    recipe = bench_recipe(max_length, seed, embed, gradients, propagate)
    data = Path(data_dir)
    with watch("tokenize"):
        pool = tokenized(data / "pool.jsonl", tokenizer, max_length, limit=pool_size)
        targets = tokenized(data / "targets" / target / "dev.jsonl", tokenizer, max_length)
    ids = list(pool["sample_id"])
    store = open_store(
        Path(work_dir) / "lancedb", f"scaling_{pool_size}", fingerprint, recipe, net.config.hidden_size
    )
    with watch("embeddings"):
        embed_pool(net, tokenizer, pool, store, recipe.embed)
    landmarks, _ = choose_landmarks(ids, num_landmarks, 0, seed)
    with watch("landmark_gradients"):
        g_landmarks = compute_gradients(net, tokenizer, pool, landmarks, recipe.gradients)
    with watch("target_gradients"):
        g_targets = compute_gradients(net, tokenizer, targets, None, recipe.gradients)
    values = landmark_values(g_landmarks.grads, g_targets.grads, "mean")
    with watch("propagation"):
        out_ids, scores, _ = propagate_scores(store, ids, landmarks, values, recipe.propagate)
    with watch("selection"):
        select_samples(out_ids, scores, max(1, round(budget_fraction * len(out_ids))))
    return {"pool_n": len(ids), "stage_seconds": watch.seconds}


def run(params: dict[str, Any], results_dir: Path, work_dir: Path, profile: str, machine: dict) -> dict:
    start = time.perf_counter()
    sizes = sorted(params["pool_sizes"])
    data_dir = builtin_data(work_dir, max(sizes), params.get("seed", 0))
    child_params = {k: v for k, v in params.items() if k not in ("pool_sizes", "time_budget_s")}
    rows, skipped = [], []
    budget = params.get("time_budget_s")
    for n in sizes:
        if rows and budget is not None:
            # Linear projection from the last size: skip a size that would overrun the time budget.
            projected = rows[-1]["total_s"] * n / rows[-1]["N"] + 10
            if time.perf_counter() - start + projected > budget:
                skipped.append(n)
                continue
        child = run_child(
            NAME,
            "measure",
            {**child_params, "pool_size": n, "work_dir": str(work_dir), "data_dir": str(data_dir)},
        )
        row = {"N": child["pool_n"], "peak_rss_gib": child["peak_rss_gib"]}
        for stage in STAGES:
            row[f"{stage}_s"] = child["stage_seconds"].get(stage, 0.0)
        row["total_s"] = sum(row[f"{s}_s"] for s in STAGES)
        rows.append(row)
        print(
            f"scaling: N={n} total {row['total_s']:.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True
        )
    small, large = rows[0], rows[-1]
    growth = large["N"] / small["N"]
    # Per-sample time of the largest pool over the smallest: 1.0 is perfectly linear in N.
    linearity = {
        s: (large[f"{s}_s"] / large["N"]) / (small[f"{s}_s"] / small["N"])
        if small[f"{s}_s"] > 0
        else float("nan")
        for s in ("tokenize", "embeddings", "propagation", "selection")
    }
    n_dependent = ("tokenize", "embeddings", "propagation", "selection")
    per_sample = [sum(r[f"{s}_s"] for s in n_dependent) / r["N"] for r in rows]
    figures = {
        "pool_sizes": [r["N"] for r in rows],
        "peak_rss_ratio_largest_over_smallest": large["peak_rss_gib"] / small["peak_rss_gib"],
        "peak_rss_gib_by_n": {str(r["N"]): r["peak_rss_gib"] for r in rows},
        "n_dependent_s_per_sample_by_n": {str(r["N"]): v for r, v in zip(rows, per_sample, strict=True)},
        "per_sample_time_ratio_largest_over_smallest": linearity,
        "total_time_ratio_largest_over_smallest": large["total_s"] / small["total_s"],
        "pool_growth": growth,
        "skipped_pool_sizes": skipped,
        "goal_peak_rss_ratio": 1.2,
    }
    figures["meets_goal"] = bool(
        figures["peak_rss_ratio_largest_over_smallest"] <= 1.2 and per_sample[-1] / per_sample[0] <= 1.25
    )
    notes = [
        "one child process per N; peak RSS is that child's ru_maxrss (includes the interpreter, torch and the model)",
        "landmark and target gradient stages are fixed-size (L and T do not grow with N)",
        "per_sample_time_ratio: (stage time / N) at the largest N over the smallest; 1.0 = linear",
        "single run per N (no repeats)",
        *[f"N={n} skipped: its projected time would overrun time_budget_s" for n in skipped],
    ]
    print_table(f"[4] scaling ({params['model']}, L={params['num_landmarks']})", rows)
    write_result(
        results_dir, NAME, profile, params, figures, rows, notes, machine, time.perf_counter() - start
    )
    return figures
