"""Benchmark: hardware-aware precision, the gradient sketch and length bucketing (issue 10), in one run.

``python -m benchmarks.studies.hardware [--pool 300] [--landmarks 64] [--holdout 24]`` measures, on the default model
and the built-in pool (max_length 192, the main job's), and writes ``results/hardware.json``:

1. the ``auto`` precision decision (capability, probe timings) on this machine;
2. per-sample gradient reduction time (CountSketch, SRHT; P = 8192) against the backward that produced the
   ``down_proj`` gradient (26.5M coordinates), measured on the same samples in one loop (goal <= 0.25x);
3. JVP embedding per-sample cost in float32 and bfloat16 (bucketed batches of 8) and the gradient
   per-sample cost (backward + CountSketch) in float32 and bfloat16 autocast;
4. embeddings one-at-a-time vs length-bucketed vs unsorted batches on the same mixed-length samples, with
   each one's padding fraction (goal >= 2.5x one-at-a-time);
5. fidelity (Spearman rho on held-out pool samples, arith target): CountSketch vs SRHT gradients (the same
   backward feeds both), float32 vs bfloat16 embeddings. SMALL: 300-sample pool, L = 64, 24 held out, so rho
   moves by ~0.1-0.2 between seeds; it shows "no collapse", not a fine difference.

``--part forced`` (run by the main part in a child with ``ATEN_CPU_CAPABILITY=avx2`` and, separately, also
``ONEDNN_MAX_CPU_ISA=AVX2``) measures what ``auto`` picks when torch's kernels are forced down to AVX2 and the
bf16/fp32 JVP ratio there: a SIMULATION of an AVX2-only CPU on this one, not an AMD machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, builtin_data, machine_info, print_table, tokenized, write_result

NAME = "hardware"
MODEL = "smollm2-135m-instruct"
MAX_LENGTH = 192


def _embed_seconds(model, pool, tokenizer, ids, config, bucket=True):
    from idistill_core.data.batch import batch_padding, batches_for
    from idistill_core.steps.embed import embed_samples

    start = time.perf_counter()
    out = {}
    for got, emb in embed_samples(model, batches_for(pool, tokenizer, config.batch_size, ids, bucket), config):
        out.update(zip(got, emb))
    seconds = time.perf_counter() - start
    padding = batch_padding(pool, config.batch_size, ids, bucket)
    return out, seconds, padding


def _forced_part() -> dict[str, Any]:
    """Child: the precision decision and the JVP per-sample cost fp32 vs bf16 under forced kernels."""
    import torch

    from benchmarks.common import load_bench_model
    from idistill_core.models.precision import PrecisionResolver
    from idistill_core.steps.embed import EmbedConfig

    net, tokenizer, _ = load_bench_model(MODEL, "cpu", 0)
    decision = PrecisionResolver().resolve_for_model("auto", net)
    pool = tokenized(builtin_data(Path(os.environ["IDISTILL_BENCH_WORK"]), 300) / "pool.jsonl", tokenizer, MAX_LENGTH)
    ids = list(pool["sample_id"])[:16]  # 8 warm-up (same shapes) + the 16 timed
    base = EmbedConfig(num_blocks=4, num_tangents=2, proj_dim=1024, batch_size=8, hidden="none")  # as measured
    per_sample = {}
    for dtype in ("float32", "bfloat16"):
        cfg = dataclasses.replace(base, dtype=dtype)
        _embed_seconds(net, pool, tokenizer, ids, cfg)  # warm-up on the same shapes
        _, seconds, _ = _embed_seconds(net, pool, tokenizer, ids, cfg)
        per_sample[dtype] = seconds / len(ids)
    return {
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
        "auto_decision": decision.as_metadata(),
        "auto_summary": decision.summary(),
        "jvp_s_per_sample_float32": round(per_sample["float32"], 4),
        "jvp_s_per_sample_bfloat16": round(per_sample["bfloat16"], 4),
        "jvp_bf16_over_fp32": round(per_sample["bfloat16"] / per_sample["float32"], 2),
        "samples": len(ids),
    }


def _run_forced(work: Path, extra_env: dict[str, str]) -> dict[str, Any]:
    env = {**os.environ, **extra_env, "IDISTILL_BENCH_WORK": str(work)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.studies.hardware", "--part", "forced"],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    if proc.returncode != 0:
        return {"env": extra_env, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(
    pool_size: int, num_landmarks: int, num_holdout: int, work: Path, grad_samples: int = 4, num_targets: int = 8
) -> dict:
    import numpy as np
    import torch

    from benchmarks.common import load_bench_model
    from idistill_core.data.batch import batches_for
    from idistill_core.models.precision import PrecisionResolver
    from idistill_core.pipeline.landmarks import choose_landmarks
    from idistill_core.pipeline.propagation import spearman
    from idistill_core.steps import gradients as G
    from idistill_core.steps.embed import EmbedConfig
    from idistill_core.steps.influence import landmark_values
    from idistill_core.steps.propagate import KernelRidge, PropagateConfig

    figures: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    net, tokenizer, _ = load_bench_model(MODEL, "cpu", 0)
    net.eval()
    decision = PrecisionResolver().resolve_for_model("auto", net)
    figures["auto_decision"] = decision.as_metadata()
    figures["auto_summary"] = decision.summary()
    print("precision auto:", decision.summary(), flush=True)

    folder = builtin_data(work, pool_size)
    pool = tokenized(folder / "pool.jsonl", tokenizer, MAX_LENGTH)
    targets = tokenized(folder / "targets" / "arith" / "dev.jsonl", tokenizer, MAX_LENGTH, limit=num_targets)
    ids = list(pool["sample_id"])
    lengths = [len(x) for x in pool["input_ids"]]
    figures["pool_tokens"] = {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)}

    # --- embeddings: float32 and bfloat16 over the whole pool, bucketed batches of 8 ---------------------
    base = EmbedConfig(num_blocks=4, num_tangents=2, proj_dim=1024, batch_size=8, hidden="none")  # as measured
    emb = {}  # cold passes: each meets its shapes for the first time, as the main job's embeddings do
    for dtype in ("float32", "bfloat16"):
        emb[dtype], seconds, padding = _embed_seconds(net, pool, tokenizer, ids, dataclasses.replace(base, dtype=dtype))
        figures[f"jvp_s_per_sample_{dtype}"] = round(seconds / len(ids), 4)
        rows.append({"what": f"jvp embeddings {dtype}, bucketed b=8", "samples": len(ids),
                     "s_per_sample": round(seconds / len(ids), 4), "padding": round(padding, 3)})
        print(rows[-1], flush=True)
    figures["jvp_bf16_over_fp32"] = round(figures["jvp_s_per_sample_bfloat16"] / figures["jvp_s_per_sample_float32"], 2)

    # --- bucketing: one at a time vs bucketed vs unsorted, same samples, the auto dtype ------------------
    # Each variant twice: the first pass meets new tensor shapes (kernel set-up per shape, as a fresh main job
    # does), the second is warm; the first 32 pool samples were already embedded above in batches of 8.
    subset = ids[32:64]
    auto = dataclasses.replace(base, dtype=decision.dtype)
    rates = {}
    for label, cfg, bucket in (
        ("one_at_a_time", dataclasses.replace(auto, batch_size=1), False),
        ("unsorted_b8", auto, False),
        ("bucketed_b8", auto, True),
    ):
        for run in ("cold", "warm"):
            _, seconds, padding = _embed_seconds(net, pool, tokenizer, subset, cfg, bucket)
            rates[f"{label}_{run}"] = len(subset) / seconds
            rows.append({"what": f"jvp {label} {run} ({decision.dtype})", "samples": len(subset),
                         "s_per_sample": round(seconds / len(subset), 4), "padding": round(padding, 3)})
            print(rows[-1], flush=True)
        figures[f"padding_{label}"] = round(padding, 3)
    for run in ("cold", "warm"):
        one = rates[f"one_at_a_time_{run}"]
        figures[f"bucketed_over_one_at_a_time_{run}"] = round(rates[f"bucketed_b8_{run}"] / one, 2)
        figures[f"unsorted_over_one_at_a_time_{run}"] = round(rates[f"unsorted_b8_{run}"] / one, 2)

    # --- gradients: one backward per sample feeds every reducer; time each separately --------------------
    landmark_ids, holdout_ids = choose_landmarks(ids, num_landmarks, num_holdout, seed=0)
    reducers = {}
    build = {}
    for label, proj_type, seed in (("countsketch", "countsketch", 1), ("srht", "srht", 1)):
        start = time.perf_counter()
        reducers[label] = G._Reducer(net, G.GradientConfig(proj_type=proj_type, proj_dim=8192, seed=seed), None)
        build[label] = round(time.perf_counter() - start, 3)
    figures["projector_build_s"] = build
    names = reducers["srht"].names
    figures["gradient_coordinates"] = reducers["srht"].dim

    def reduce_all(examples, wanted, autocast=False):
        out = {label: [] for label in reducers}
        times = {"backward": [], **{label: [] for label in reducers}}
        for batch in batches_for(examples, tokenizer, 1, wanted):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                grads = G._per_sample(net, batch, names, 1)
            times["backward"].append(time.perf_counter() - start)
            for label, reducer in reducers.items():
                start = time.perf_counter()
                out[label].append(reducer(grads, batch.sample_ids))
                times[label].append(time.perf_counter() - start)
            del grads
        return {k: torch.cat(v) for k, v in out.items()}, times

    target_g, _ = reduce_all(targets, None)
    pool_g, times = reduce_all(pool, landmark_ids + holdout_ids)
    med = {k: statistics.median(v) for k, v in times.items()}
    for label in reducers:
        figures[f"reduce_over_backward_{label}"] = round(med[label] / med["backward"], 3)
    figures["backward_s_median"] = round(med["backward"], 4)
    figures["reduce_s_median"] = {k: round(med[k], 4) for k in reducers}
    rows.append({"what": "down_proj backward (fp32, batch 1)", "samples": len(times["backward"]),
                 "s_per_sample": round(med["backward"], 4)})
    for label in reducers:
        rows.append({"what": f"reduce {label} (P=8192)", "samples": len(times[label]),
                     "s_per_sample": round(med[label], 4), "x_backward": figures[f"reduce_over_backward_{label}"]})

    # bf16-autocast gradient cost on a few samples (CountSketch reduction)
    few = landmark_ids[:grad_samples]
    for label, ac in (("float32", False), ("bfloat16", True)):
        _, t = reduce_all(pool, few[:1], ac)  # warm-up
        _, t = reduce_all(pool, few, ac)
        per = statistics.median([b + c for b, c in zip(t["backward"], t["countsketch"], strict=True)])
        figures[f"gradient_s_per_sample_{label}"] = round(per, 4)
        rows.append({"what": f"gradient + countsketch {label}", "samples": len(few), "s_per_sample": round(per, 4)})
    figures["gradient_bf16_over_fp32"] = round(
        figures["gradient_s_per_sample_bfloat16"] / figures["gradient_s_per_sample_float32"], 2)

    # --- fidelity: rho on held-out samples ----------------------------------------------------------------
    config = PropagateConfig(kernel="rbf", ridge=0.01)
    fid = {}
    for emb_dtype in ("float32", "bfloat16"):
        land_emb = np.stack([emb[emb_dtype][s] for s in landmark_ids])
        hold_emb = np.stack([emb[emb_dtype][s] for s in holdout_ids])
        ridge = KernelRidge.fit(land_emb, config)
        for label in reducers:
            g = pool_g[label]
            lv = landmark_values(g[: len(landmark_ids)], target_g[label], "mean")
            hv = landmark_values(g[len(landmark_ids):], target_g[label], "mean")
            predicted = np.asarray(ridge.predict(lv, [hold_emb]))[:, 0]
            fid[f"{label}|emb_{emb_dtype}"] = round(spearman(predicted, hv[:, 0]), 3)
    # exact agreement between the sketches themselves (same backward): rho of held-out exact values
    hv = {label: landmark_values(pool_g[label][len(landmark_ids):], target_g[label], "mean")[:, 0] for label in reducers}
    fid["exact_values_rho_countsketch_vs_srht"] = round(spearman(hv["countsketch"], hv["srht"]), 3)
    figures["fidelity"] = fid
    print(json.dumps(fid, indent=1), flush=True)
    return {"figures": figures, "rows": rows}


def run(params: dict[str, Any], results_dir: Path, work: Path, profile: str, machine: dict[str, Any]) -> dict:
    start = time.perf_counter()
    result = measure(
        params["pool_size"], params["num_landmarks"], params["num_holdout"], Path(work),
        grad_samples=params.get("grad_samples", 4), num_targets=params.get("num_targets", 8),
    )
    figures = result["figures"]
    # written now too, so a run killed during the forced-kernel children keeps the main figures
    write_result(results_dir, NAME, profile, params, figures, result["rows"], [], machine, time.perf_counter() - start)
    forced = {}
    for label, env in (("aten_avx2", {"ATEN_CPU_CAPABILITY": "avx2"}),
                       ("aten_and_onednn_avx2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})):
        print(f"forced kernels {label} ...", flush=True)
        forced[label] = _run_forced(Path(work), env)
        print(json.dumps(forced[label])[:600], flush=True)
    figures["forced_avx2_simulation"] = forced
    notes = [
        (
            f"Small fidelity set: {params['pool_size']}-sample built-in pool, L={params['num_landmarks']},"
            f" {params['num_holdout']} held out, arith target ({params.get('num_targets', 8)} dev samples); rho"
            " moves by ~0.1-0.2 between seeds at this size."
        ),
        (
            "Forced AVX2 is a simulation on this CPU (ATEN_CPU_CAPABILITY=avx2, and also ONEDNN_MAX_CPU_ISA=AVX2,"
            " since bf16 GEMMs go through oneDNN, which ignores the ATen setting); not an AMD machine."
        ),
        "Shared 2-core machine: other jobs ran alongside (load average in machine).",
    ]
    print(print_table("hardware", result["rows"]))
    write_result(results_dir, NAME, profile, params, figures, result["rows"], notes, machine, time.perf_counter() - start)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "forced"], default="all")
    parser.add_argument("--pool", type=int, default=300)
    parser.add_argument("--landmarks", type=int, default=64)
    parser.add_argument("--holdout", type=int, default=24)
    parser.add_argument("--targets", type=int, default=8, help="arith dev samples (target gradients)")
    parser.add_argument("--grad-samples", type=int, default=4, help="samples for the fp32/bf16 gradient cost")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/idistill-bench-hardware"))
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.part == "forced":
        print(json.dumps(_forced_part(), default=str))
        return 0
    args.work_dir.mkdir(parents=True, exist_ok=True)
    params = {"pool_size": args.pool, "num_landmarks": args.landmarks, "num_holdout": args.holdout,
              "num_targets": args.targets, "grad_samples": args.grad_samples, "model": MODEL, "max_length": MAX_LENGTH}
    run(params, args.results_dir, args.work_dir, "full", machine_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
