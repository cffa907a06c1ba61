"""Benchmark: memory and time of the sketched second order (issue 11, "Second order that fits").

Two fresh child processes, so each peak RSS (``ru_maxrss``) is that phase's own:

- ``terms``: ``influence.sketched_second_order_terms`` on the model with ``L`` landmarks from the built-in pool
  and ``T`` target samples, the main job's gradient recipe (``down_proj``, SRHT to 8192). Memory should be
  ``O(L · P + d)`` plus the target graph; time is one gradient + one HVP through the target graph per landmark.
  Progress (seconds per landmark) is printed per landmark to stderr as it runs.
- ``qp``: ``pipeline.qp_outcome`` on a pool of ``N`` synthetic float32 coefficients ``C (N, L)`` with those
  terms (``PoolQPConfig`` default: float32 products, ``C`` in float32 memory; no N × L float64 copy).

Figures: ``second_order_peak_rss_gib_l{L}`` (the larger of the two peaks), ``seconds_per_landmark_l{L}``,
``qp_peak_rss_gib_n{N}_l{L}``, ``qp_seconds_n{N}_l{L}``. At L = 512 the peak also goes into the figures of
``scale.json`` (read-modify-write, other figures kept) with the CPU model.

    nice -n 10 python -m benchmarks.second_order_memory --landmarks 32 --targets 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

NAME = "second_order_memory"
DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m-instruct",
    "num_landmarks": 8,
    "target": "arith",
    "target_examples": 2,
    "max_length": 192,
    # the main job's recipe (profiles/default.yaml)
    "gradients": {"param_subset": "down_proj", "proj_type": "srht", "proj_dim": 8192},
    "lr": 1e-4,
    "qp_pool_size": 100_000,
    "qp": {},
    "seed": 0,
}


def child_terms(params: dict[str, Any], work_dir: str) -> dict[str, Any]:
    """The landmark terms p (L,), Q (L, L) on the real model; returns them with per-landmark seconds."""
    from benchmarks.common import builtin_data, load_bench_model, tokenized
    from idistill_core.data.batch import batches_for
    from idistill_core.steps.gradients import GradientConfig
    from idistill_core.steps.second_order import sketched_second_order_terms

    model, tokenizer, _ = load_bench_model(params["model"], "cpu", params["seed"])
    model.eval()
    num_l = params["num_landmarks"]
    data = builtin_data(work_dir, max(64, num_l), params["seed"])
    pool = tokenized(data / "pool.jsonl", tokenizer, params["max_length"])
    targets = tokenized(
        data / "targets" / params["target"] / "dev.jsonl", tokenizer, params["max_length"],
        limit=params["target_examples"],
    )
    rng = np.random.default_rng(params["seed"])
    ids = list(pool["sample_id"])
    landmark_ids = [ids[i] for i in sorted(rng.choice(len(ids), size=num_l, replace=False))]
    stamps: list[float] = []

    def landmarks():
        # the terms loop asks for the next landmark after finishing the previous one (gradient + HVP)
        for j, batch in enumerate(batches_for(pool, tokenizer, 1, ids=landmark_ids)):
            now = time.perf_counter()
            if stamps:
                print(f"[{NAME}] landmark {j}/{num_l}: {now - stamps[-1]:.1f} s", file=sys.stderr, flush=True)
            stamps.append(now)
            yield batch

    start = time.perf_counter()
    terms = sketched_second_order_terms(
        model, landmarks(), batches_for(targets, tokenizer, 1), GradientConfig(**params["gradients"]),
        lr=params["lr"],
    )
    end = time.perf_counter()
    stamps.append(end)
    per_landmark = np.diff(stamps).tolist()  # the last interval also holds the final stacking (negligible)
    print(f"[{NAME}] landmark {num_l}/{num_l}: {per_landmark[-1]:.1f} s", file=sys.stderr, flush=True)
    return {
        "seconds_total": end - start,
        "seconds_target_graph": stamps[0] - start,
        "seconds_per_landmark": per_landmark,
        "p": terms.p.tolist(),
        "q": terms.q.tolist(),
        "lr": terms.lr,
        "num_source": terms.num_source,
        "target_samples": len(targets),
    }


def child_qp(p: list[float], q: list[list[float]], lr: float, num_source: int, n: int, qp: dict, seed: int):
    """``qp_outcome`` on ``N`` synthetic float32 coefficient rows (non-negative, summing to ~1 like KRR rows)."""
    from idistill_core.pipeline.recipe import SelectionRecipe
    from idistill_core.pipeline.second_order import qp_outcome
    from idistill_core.steps.pool_qp import PoolQPConfig

    num_l = len(p)
    rng = np.random.default_rng(seed)
    c = np.empty((n, num_l), dtype=np.float32)
    for first in range(0, n, 65536):  # chunked so generation itself never holds a float64 N × L
        block = rng.random((min(65536, n - first), num_l), dtype=np.float32) ** 4
        c[first : first + block.shape[0]] = block / block.sum(1, keepdims=True)
    second = {"p": np.asarray(p), "q": np.asarray(q), "lr": np.array([lr]), "num_source": np.array([num_source])}
    ids = [f"s{i:08d}" for i in range(n)]
    start = time.perf_counter()
    outcome = qp_outcome(ids, c, second, max(1, n // 10), SelectionRecipe(), PoolQPConfig(**qp))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "selected": len(outcome.selected), "n": n}


def measure(params: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    from benchmarks.common import run_child

    terms = run_child(NAME, "child_terms", {"params": params, "work_dir": str(work_dir)})
    qp = run_child(
        NAME, "child_qp",
        {
            "p": terms["p"], "q": terms["q"], "lr": terms["lr"], "num_source": terms["num_source"],
            "n": params["qp_pool_size"], "qp": params["qp"], "seed": params["seed"],
        },
    )
    return {"terms": terms, "qp": qp}


def figures_from(params: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    num_l, n = params["num_landmarks"], params["qp_pool_size"]
    terms, qp = record["terms"], record["qp"]
    return {
        f"second_order_peak_rss_gib_l{num_l}": round(max(terms["peak_rss_gib"], qp["peak_rss_gib"]), 3),
        f"terms_peak_rss_gib_l{num_l}": terms["peak_rss_gib"],
        f"seconds_per_landmark_l{num_l}": round(float(np.median(terms["seconds_per_landmark"])), 2),
        f"qp_peak_rss_gib_n{n}_l{num_l}": qp["peak_rss_gib"],
        f"qp_seconds_n{n}_l{num_l}": round(qp["seconds"], 2),
    }


def merge_into_scale(results_dir: Path, figures: dict[str, Any], machine: dict[str, Any]) -> None:
    """Add the L = 512 peak to ``scale.json``'s figures (read-modify-write: everything else is kept)."""
    from benchmarks.common import merge_scale_figures

    merge_scale_figures(
        results_dir,
        {"second_order_peak_rss_gib_l512": figures["second_order_peak_rss_gib_l512"], "second_order_cpu": machine.get("cpu")},
    )


def run(params: dict, results_dir: Path, work_dir: Path, profile: str, machine: dict) -> dict:
    """Suite entry (benchmarks/run.py): measure, write ``second_order_memory.json``, return its figures."""
    from benchmarks.common import write_result

    params = {**DEFAULTS, **params}
    start = time.perf_counter()
    record = measure(params, Path(work_dir))
    figures = figures_from(params, record)
    terms = {k: v for k, v in record["terms"].items() if k not in ("p", "q")}
    notes = [
        ("terms: sketched_second_order_terms (one gradient + one HVP through the target graph per landmark);"
        " qp: qp_outcome on synthetic float32 coefficients, PoolQPConfig as in params.qp"),
    ]
    write_result(
        results_dir, NAME, profile, params, figures, [{"phase": "terms", **terms}, {"phase": "qp", **record["qp"]}],
        notes, machine, time.perf_counter() - start,
    )
    if params["num_landmarks"] == 512:
        merge_into_scale(results_dir, figures, machine)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--landmarks", type=int, default=DEFAULTS["num_landmarks"])
    parser.add_argument("--targets", type=int, default=DEFAULTS["target_examples"], help="target samples T")
    parser.add_argument("--pool", type=int, default=DEFAULTS["qp_pool_size"], help="N of the QP")
    parser.add_argument("--model", default=DEFAULTS["model"])
    parser.add_argument("--work-dir", default="/tmp/idistill-second-order-memory")
    parser.add_argument("--results-dir", default="benchmarks/results")
    args = parser.parse_args()
    from benchmarks.common import git_commit, machine_info, utc_now

    params = {
        **DEFAULTS, "num_landmarks": args.landmarks, "target_examples": args.targets, "qp_pool_size": args.pool,
        "model": args.model,
    }
    machine = {**machine_info(), "started_utc": utc_now(), "git_commit": git_commit()}
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    figures = run(params, Path(args.results_dir), Path(args.work_dir), "cli", machine)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
