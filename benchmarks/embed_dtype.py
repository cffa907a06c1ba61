"""Extra benchmark (not in the default order): do bfloat16 JVP embeddings keep ID's fidelity?

Benchmark 1 shows a bfloat16 JVP pass costs about a third of the float32 one on this CPU (AMX). This embeds
the same pool in both dtypes and propagates the SAME landmark influences (same exact gradients) through each,
so the only difference in Spearman ρ against exact on the held-out samples is the embedding dtype.
Run with ``python -m benchmarks.run --only embed_dtype``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import print_table, run_child, write_result

NAME = "embed_dtype"


def measure(
    model: str,
    device: str,
    work_dir: str,
    pool_size: int,
    num_landmarks: int,
    num_holdout: int,
    targets: list[str],
    target_examples: int | None,
    max_length: int,
    embed: dict,
    gradients: dict,
    propagate: dict,
    dtypes: list[str],
    seed: int = 0,
) -> dict[str, Any]:
    """Child side: per dtype, embedding seconds per sample and held-out ρ with shared landmark gradients."""
    from benchmarks import workload
    from idistill_core.data.batch import batches_for
    from idistill_core.steps.embed import embed_samples
    from idistill_core.steps.propagate import KernelRidge

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
    ids = workload.shuffled_ids(work)[:pool_size]
    holdout, order = workload.split(ids, num_holdout)
    landmarks = order[:num_landmarks]
    target_grads, _ = workload.target_gradients(work)
    g_landmarks, _, _ = workload.exact_gradients(work, work.pool, landmarks)
    g_holdout, _, _ = workload.exact_gradients(work, work.pool, holdout)
    values = workload.influence(g_landmarks, target_grads)
    exact = workload.influence(g_holdout, target_grads)
    rows = []
    for dtype in dtypes:
        config = dataclasses.replace(work.recipe.embed, dtype=dtype)
        start = time.perf_counter()
        vectors = {}
        for batch_ids, emb in embed_samples(
            work.model, batches_for(work.pool, work.tokenizer, 8, ids=ids), config
        ):
            vectors.update(zip(batch_ids, emb, strict=True))
        seconds = time.perf_counter() - start
        ridge = KernelRidge.fit(np.stack([vectors[s] for s in landmarks]), work.recipe.propagate)
        predicted = ridge.predict(values, [np.stack([vectors[s] for s in holdout])]).numpy()
        agreement = workload.rank_agreement(predicted, exact)
        rows.append(
            {
                "dtype": dtype,
                "embed_s_per_sample": seconds / len(ids),
                "spearman_mean": float(np.mean(agreement["spearman"])),
                "spearman_per_target": agreement["spearman"],
                "top10_overlap_mean": float(np.mean(agreement["top_overlap"])),
            }
        )
        print(f"embed_dtype: {dtype} rho={rows[-1]['spearman_mean']:.3f}", flush=True)
    return {"rows": rows, "pool_n": len(ids), "num_landmarks": len(landmarks), "num_holdout": len(holdout)}


def run(params: dict[str, Any], results_dir: Path, work_dir: Path, profile: str, machine: dict) -> dict:
    start = time.perf_counter()
    child = run_child(NAME, "measure", {**params, "work_dir": str(work_dir)})
    rows = {r["dtype"]: r for r in child["rows"]}
    figures: dict[str, Any] = {
        "spearman_by_dtype": {d: r["spearman_mean"] for d, r in rows.items()},
        "embed_s_per_sample_by_dtype": {d: r["embed_s_per_sample"] for d, r in rows.items()},
        "peak_rss_gib": child["peak_rss_gib"],
    }
    if "float32" in rows and "bfloat16" in rows:
        figures["bf16_time_over_fp32"] = (
            rows["bfloat16"]["embed_s_per_sample"] / rows["float32"]["embed_s_per_sample"]
        )
        figures["bf16_spearman_minus_fp32"] = (
            rows["bfloat16"]["spearman_mean"] - rows["float32"]["spearman_mean"]
        )
    notes = [
        (
            f"pool N={child['pool_n']}, L={child['num_landmarks']} landmarks, rho on {child['num_holdout']} "
            "held-out samples; both dtypes propagate the same exact landmark influences"
        ),
        "single run per dtype",
    ]
    print_table(f"[extra] embedding dtype ({params['model']}, L={child['num_landmarks']})", child["rows"])
    write_result(
        results_dir,
        NAME,
        profile,
        params,
        figures,
        child["rows"],
        notes,
        machine,
        time.perf_counter() - start,
    )
    return figures
