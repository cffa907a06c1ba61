"""Benchmark: CountSketch vs SRHT gradient sketches, and float32 vs bfloat16-autocast gradients, against the exact
(unprojected, float32) first-order values on held-out real rows (issue 24).

``OMP_NUM_THREADS=1 python -m benchmarks.studies.sketch_fidelity [--rows 320] [--seeds 2]`` on the default model
(SmolLM2-135M-Instruct, eager attention), the real pool (``.idistill/realdata/pool.jsonl``, a seeded sample of
``--rows`` rows, none of them a landmark or target of anything here) and three real targets (their 8 dev rows
each), max length 192 (the profile's). Per pool row, one float32 backward and one bfloat16-autocast backward
give the ``down_proj`` gradient (26.5M coordinates); its unit vector ``u`` is scored against every target's
mean unit gradient ``ḡ`` exactly (``u·ḡ``, float64 accumulation) and through each sketch (``Su·Sḡ``, P = 8192,
the pipeline's ``_Reducer``; ``Sḡ`` is the mean of the sketched unit target gradients, as the pipeline builds
it; bfloat16 rows through CountSketch only). Reported: Spearman ρ and Pearson r of sketched vs exact values per target and sketch seed, and the median
time per row of each backward and each reduction, all measured in the same loop (interleaved), one thread.

Writes ``benchmarks/results/sketch_fidelity.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, RESULTS_DIR, git_commit, machine_info, utc_now, write_result

NAME = "sketch_fidelity"
MODEL = "smollm2-135m-instruct"
MAX_LENGTH = 192
PROJ_DIM = 8192
TARGETS = ("gsm8k_short", "arc", "mbpp")


def _spearman(a, b) -> float:
    import numpy as np
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a), np.asarray(b)).statistic)


def _pearson(a, b) -> float:
    import numpy as np

    return float(np.corrcoef(np.asarray(a), np.asarray(b))[0, 1])


def measure(num_rows: int, seeds: int, realdata: Path, seed: int = 0) -> dict:
    import torch

    from benchmarks.common import tokenized
    from idistill_core.data.batch import batches_for
    from idistill_core.models.loading import load_model
    from idistill_core.models.precision import PrecisionResolver
    from idistill_core.steps import gradients as G

    torch.set_num_threads(1)
    loaded = load_model(MODEL, attn_implementation="eager")
    net, tokenizer = loaded.model, loaded.tokenizer
    net.eval()
    decision = PrecisionResolver().resolve_for_model("auto", net, workload="gradients")
    pool = tokenized(realdata / "pool.jsonl", tokenizer, MAX_LENGTH)
    ids = list(pool["sample_id"])
    rows = sorted(random.Random(seed).sample(ids, num_rows))
    names = G.select_parameters(net, "down_proj")
    reducers = {
        (kind, s): G._Reducer(net, G.GradientConfig(proj_type=kind, proj_dim=PROJ_DIM, seed=s, dtype="float32"), None)
        for kind in ("countsketch", "srht")
        for s in range(1, seeds + 1)
    }

    def unit_flat(grads) -> torch.Tensor:
        flat = torch.cat([grads[n].reshape(1, -1) for n in names], dim=1)
        return flat / flat.double().norm()

    # targets: exact mean unit gradient and every sketch of it (float32 backward, the exact reference)
    exact_targets, sketched_targets = {}, {}
    for target in TARGETS:
        dev = tokenized(realdata / "targets" / target / "dev.jsonl", tokenizer, MAX_LENGTH)
        total, sk, count = None, {k: 0 for k in reducers}, 0
        for batch in batches_for(dev, tokenizer, 1):
            grads = G._per_sample(net, batch, names, 1)
            u = unit_flat(grads)
            total = u if total is None else total + u
            for key, reducer in reducers.items():
                sk[key] = sk[key] + reducer(grads, batch.sample_ids)[0].double()
            count += 1
        exact_targets[target] = (total / count)[0].double()
        sketched_targets[target] = {k: v / count for k, v in sk.items()}
        print(f"target {target}: {count} dev rows", flush=True)

    values = {"exact": {t: [] for t in TARGETS}}
    for dtype in ("float32", "bfloat16"):
        values[f"exact_{dtype}"] = {t: [] for t in TARGETS}
        for key in reducers:
            if dtype == "float32" or key[0] == "countsketch":
                values[f"{key[0]}_s{key[1]}_{dtype}"] = {t: [] for t in TARGETS}
    times: dict[str, list[float]] = {"backward_float32": [], "backward_bfloat16": []}
    times.update({f"reduce_{k}_s{s}": [] for k, s in reducers})
    start_all = time.perf_counter()
    for i, batch in enumerate(batches_for(pool, tokenizer, 1, ids=rows)):
        for dtype in ("float32", "bfloat16"):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                grads = G._per_sample(net, batch, names, 1)
            times[f"backward_{dtype}"].append(time.perf_counter() - start)
            u = unit_flat(grads)[0].double()
            for t in TARGETS:
                values[f"exact_{dtype}"][t].append(float(u @ exact_targets[t]))
            del u
            for (kind, s), reducer in reducers.items():
                if dtype == "bfloat16" and kind != "countsketch":
                    continue  # bf16 rows are for the default sketch; SRHT's fidelity is read in float32
                start = time.perf_counter()
                su = reducer(grads, batch.sample_ids)[0].double()
                if dtype == "float32":
                    times[f"reduce_{kind}_s{s}"].append(time.perf_counter() - start)
                for t in TARGETS:
                    values[f"{kind}_s{s}_{dtype}"][t].append(float(su @ sketched_targets[t][(kind, s)]))
            del grads
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{len(rows)} rows, {time.perf_counter() - start_all:.0f} s", flush=True)
    values["exact"] = values.pop("exact_float32")

    fidelity = {}
    for label, per_target in values.items():
        if label == "exact":
            continue
        fidelity[label] = {
            t: {"spearman": round(_spearman(per_target[t], values["exact"][t]), 4),
                "pearson": round(_pearson(per_target[t], values["exact"][t]), 4)}
            for t in TARGETS
        }
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "decision": decision.as_metadata(),
        "rows": len(rows),
        "gradient_coordinates": next(iter(reducers.values())).dim,
        "fidelity": fidelity,
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "values": values,
    }


def summarise(result: dict, seeds: int) -> dict:
    """Mean ρ over targets and seeds per (sketch, dtype), and per-second figures."""
    fid = result["fidelity"]
    med = result["median_seconds"]
    figures: dict = {"rows": result["rows"], "auto_gradient_dtype": result["decision"]["dtype"]}
    for kind in ("countsketch", "srht"):
        for dtype in ("float32", "bfloat16") if kind == "countsketch" else ("float32",):
            rhos = [v["spearman"] for s in range(1, seeds + 1) for v in fid[f"{kind}_s{s}_{dtype}"].values()]
            rs = [v["pearson"] for s in range(1, seeds + 1) for v in fid[f"{kind}_s{s}_{dtype}"].values()]
            figures[f"rho_{kind}_{dtype}"] = round(statistics.mean(rhos), 4)
            figures[f"rho_{kind}_{dtype}_min"] = round(min(rhos), 4)
            figures[f"pearson_{kind}_{dtype}"] = round(statistics.mean(rs), 4)
        figures[f"reduce_s_{kind}"] = round(statistics.mean(med[f"reduce_{kind}_s{s}"] for s in range(1, seeds + 1)), 4)
    for dtype in ("bfloat16",):
        figures[f"rho_exact_{dtype}_vs_float32"] = round(
            statistics.mean(v["spearman"] for v in fid[f"exact_{dtype}"].values()), 4)
        figures[f"pearson_exact_{dtype}_vs_float32"] = round(
            statistics.mean(v["pearson"] for v in fid[f"exact_{dtype}"].values()), 4)
    figures["backward_s_float32"] = med["backward_float32"]
    figures["backward_s_bfloat16"] = med["backward_bfloat16"]
    figures["srht_over_countsketch_reduce"] = round(figures["reduce_s_srht"] / figures["reduce_s_countsketch"], 2)
    for kind in ("countsketch", "srht"):
        figures[f"gradient_s_{kind}_float32"] = round(med["backward_float32"] + figures[f"reduce_s_{kind}"], 4)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=320)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--realdata", default=str(REPO_ROOT / ".idistill" / "realdata"))
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    machine = {**machine_info(), "started_utc": utc_now(), "git_commit": git_commit()}
    start = time.perf_counter()
    result = measure(args.rows, args.seeds, Path(args.realdata))
    figures = summarise(result, args.seeds)
    print(json.dumps(figures, indent=1))
    notes = [
        ("Exact reference: float32 backward, unprojected unit down_proj gradients; value = u . mean unit target "
         "gradient. Sketched: the pipeline's _Reducer, P = 8192; bfloat16 rows are autocast backwards sketched and "
         "compared with the same float32 exact values."),
        ("Times: median per row over the run, measured in one loop (fp32 backward, its reductions, bf16 backward) "
         "on one thread of a shared machine; compare ratios, not absolute seconds."),
    ]
    params = {"rows": args.rows, "seeds": args.seeds, "targets": list(TARGETS), "proj_dim": PROJ_DIM,
              "max_length": MAX_LENGTH, "model": MODEL, "pool": "realdata/pool.jsonl"}
    rows = [{"what": k, **{t: v for t, v in per.items()}} for k, per in result["fidelity"].items()]
    record_extra = {"fidelity": result["fidelity"], "median_seconds": result["median_seconds"],
                    "decision": result["decision"]}
    write_result(args.out, NAME, "cli", {**params, **record_extra}, figures, rows, notes, machine,
                 time.perf_counter() - start)


if __name__ == "__main__":
    main()
