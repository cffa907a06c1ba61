"""Benchmark: what `recipe.hessian_targets` costs the second order in selection, and saves in memory.

The second order keeps the double-backward graph of every target sample in its Hessian, so its memory grows with
them (`pipeline.second_order_terms_for`); `hessian_targets` uses a seeded sample for the Hessian and every dev
sample for the gradient term. Here, on the default model with the main job's gradient recipe, for one target:

- the terms ``p``, ``Q`` over ``L`` landmarks with the Hessian of all dev samples (the reference), and of
  ``h`` samples for each ``h`` and seed, each in a fresh child process (its own peak RSS and time);
- the landmark-level QP (``influence.qp_weights``) at ``k = L / 4`` for each η: top-k overlap with the
  reference's selection, and the first-order (``Q = 0``) selection's overlap for scale; averaged over the η where
  the reference's Q moved its selection away from first order's (elsewhere the Hessian decides nothing);
- the relative Frobenius distance of ``Q`` to the reference's.

    OMP_NUM_THREADS=1 python -m benchmarks.studies.hessian_targets            # writes benchmarks/results/hessian_targets.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

NAME = "hessian_targets"
DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m-instruct",
    "pool_size": 512,
    "num_landmarks": 24,
    "target": "arith",
    "max_length": 192,
    "gradients": {"param_subset": "down_proj", "proj_type": "srht", "proj_dim": 8192},
    "hessian_targets": [2],
    "seeds": [0, 1, 2],
    # from the recipe's η (1e-4) up to steps where Q decides the selection: only η where the reference's
    # selection differs from first order's say anything about the Hessian
    "etas": [10.0**e for e in range(-4, 5)],
    "seed": 0,
}
SMOKE: dict[str, Any] = {
    **DEFAULTS, "model": "tiny-llama", "pool_size": 48, "num_landmarks": 8, "max_length": 64,
    "gradients": {"param_subset": "down_proj", "proj_type": "srht", "proj_dim": 256},
    "hessian_targets": [2], "seeds": [0, 1], "etas": [1e-2, 1.0, 1e2],
}


def child_terms(params: dict[str, Any], work_dir: str, hessian_targets: int | None, seed: int) -> dict[str, Any]:
    """``p`` and ``Q`` through the pipeline's own path, with the Hessian of ``hessian_targets`` dev samples."""
    from benchmarks.common import builtin_data, load_bench_model, tokenized
    from idistill_core.pipeline.landmarks import choose_landmarks
    from idistill_core.pipeline.recipe import SelectionRecipe
    from idistill_core.pipeline.second_order import second_order_terms_for
    from idistill_core.steps.gradients import GradientConfig

    model, tokenizer, _ = load_bench_model(params["model"], "cpu", params["seed"])
    model.eval()
    data = builtin_data(work_dir, params["pool_size"], params["seed"])
    pool = tokenized(data / "pool.jsonl", tokenizer, params["max_length"])
    dev = tokenized(data / "targets" / params["target"] / "dev.jsonl", tokenizer, params["max_length"])
    landmark_ids, _ = choose_landmarks(list(pool["sample_id"]), params["num_landmarks"], 0, params["seed"])
    recipe = SelectionRecipe(
        order="second", hessian_targets=hessian_targets, seed=seed, max_length=params["max_length"],
        gradients=GradientConfig(**params["gradients"]),
    )
    start = time.perf_counter()
    terms = second_order_terms_for(model, tokenizer, pool, dev, landmark_ids, recipe)
    return {
        "seconds": time.perf_counter() - start, "p": terms["p"].tolist(), "q": terms["q"].tolist(),
        "dev_samples": len(dev),
    }


def compare(reference: dict[str, Any], run: dict[str, Any], etas: list[float], k: int) -> dict[str, Any]:
    """Top-k overlap of the landmark QP's support with the reference's at each η, and Q's relative distance."""
    import torch

    from idistill_core.steps.qp import qp_weights

    def support(terms, eta):
        weights = qp_weights(torch.tensor(terms["p"]), torch.tensor(terms["q"]), eta, k)
        return set(torch.topk(weights, k).indices.tolist())

    q_ref, q = np.asarray(reference["q"]), np.asarray(run["q"])
    first = set(np.argsort(-np.asarray(reference["p"]))[:k].tolist())
    overlap = {f"{eta:g}": len(support(run, eta) & support(reference, eta)) / k for eta in etas}
    first_overlap = {f"{eta:g}": len(first & support(reference, eta)) / k for eta in etas}
    moved = [e for e in overlap if first_overlap[e] < 1]
    return {
        "q_relative_distance": float(np.linalg.norm(q - q_ref) / np.linalg.norm(q_ref)),
        "overlap": overlap,
        "first_order_overlap": first_overlap,
        # the η where the reference's Q changed its selection (vs first order): what the Hessian sample must keep
        "overlap_where_q_matters": float(np.mean([overlap[e] for e in moved])) if moved else None,
        "first_order_overlap_where_q_matters": float(np.mean([first_overlap[e] for e in moved])) if moved else None,
    }


def measure(params: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    from benchmarks.common import run_child

    def terms(h, seed):
        print(f"[{NAME}] terms with hessian_targets={h}, seed={seed}", file=sys.stderr, flush=True)
        return run_child(f"studies.{NAME}", "child_terms", {"params": params, "work_dir": str(work_dir), "hessian_targets": h,
                                              "seed": seed})

    reference = terms(None, params["seed"])
    k = max(1, params["num_landmarks"] // 4)
    rows = [{"hessian_targets": "all", "seed": params["seed"], **_summary(reference)}]
    for h in params["hessian_targets"]:
        for seed in params["seeds"]:
            run = terms(h, seed)
            rows.append({"hessian_targets": h, "seed": seed, **_summary(run), **compare(reference, run, params["etas"], k)})
    return {"k": k, "dev_samples": reference["dev_samples"], "rows": rows}


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    # p and Q are L and L × L floats: kept, so other comparisons can be made from the record alone
    return {"peak_rss_gib": run["peak_rss_gib"], "seconds": round(run["seconds"], 1), "p": run["p"], "q": run["q"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the tiny model, in seconds")
    parser.add_argument("--work-dir", default="/tmp/idistill-hessian-targets")
    parser.add_argument("--results-dir", default="benchmarks/results")
    args = parser.parse_args()
    from benchmarks.common import git_commit, machine_info, utc_now, write_result

    params = SMOKE if args.smoke else DEFAULTS
    machine = {**machine_info(), "started_utc": utc_now(), "git_commit": git_commit()}
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    record = measure(params, Path(args.work_dir))
    figures = {"k": record["k"], "dev_samples": record["dev_samples"]}
    notes = [
        ("reference: the Hessian of every dev sample; overlap: |top-k of the landmark QP ∩ the reference's| / k per η;"
         " first_order_overlap: the Q = 0 selection's overlap with the reference, for scale"),
    ]
    path = write_result(args.results_dir, NAME, "smoke" if args.smoke else "cli", params, figures, record["rows"],
                        notes, machine, time.perf_counter() - start)
    print(json.dumps(record["rows"], indent=1))
    print(f"[{NAME}] wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
