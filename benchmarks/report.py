"""Render the results JSON as the markdown tables of BENCHMARKS.md: ``python -m benchmarks.report [DIR]``.

Only numbers from the JSON files are printed, so the document always shows a run that happened.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, fmt


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def jvp_section(record: dict[str, Any]) -> str:
    p, f = record["params"], record["figures"]
    rows = []
    for row in record["rows"]:
        seq = str(row["seq"])
        rows.append(
            {
                "seq": row["seq"],
                "batch": row["batch"],
                "JVP ms/sample": 1000 * row["jvp_s_per_sample"],
                "4-block fwd eager ms": 1000 * row["kblock_forward_eager_s_per_sample"],
                "4-block fwd sdpa ms": 1000 * row["kblock_forward_sdpa_s_per_sample"],
                "full fwd ms": 1000 * row["full_forward_s_per_sample"],
                "**JVP / 4-block fwd (eager)**": f["jvp_over_kblock_forward"][seq],
                "JVP / 4-block fwd (sdpa)": f["jvp_over_kblock_forward_sdpa"][seq],
                "JVP / full fwd": f["jvp_over_full_forward"][seq],
                "per tangent / 4-block": f["jvp_per_tangent_over_kblock_forward"][seq],
                "loop / vmap": f.get("jvp_loop_over_jvp", {}).get(seq, float("nan")),
                "bf16 / fp32": f.get("jvp_bf16_over_jvp", {}).get(seq, float("nan")),
                "full fwd / no lm_head": f["full_forward_over_full_no_lm_head"][seq],
            }
        )
    head = (
        f"`{p['model']}`, k = {p['num_blocks']} blocks, m = {p['num_tangents']} tangents, D = {p['proj_dim']}, "
        f"median of {p['repeats']} after {p['warmup']} warm-up; peak RSS {f['peak_rss_gib']:.2f} GiB.\n\n"
    )
    return head + _table(rows)


def end_to_end_section(record: dict[str, Any]) -> str:
    f = record["figures"]
    extrapolated = next(r["extrapolated"] for r in record["rows"] if "extrapolated" in r)
    child = next(r["child"] for r in record["rows"] if "child" in r)
    n = f["extrapolated_to_n"]
    stages = [
        {"stage (measured)": r["stage"], "seconds": r["measured_s"], "per pool sample": r["per_sample_s"]}
        for r in record["rows"]
        if "stage" in r
    ]
    totals = [
        {
            "method": "Influence Distillation",
            f"N = {n} (s)": extrapolated["id_total_s"],
            "embeddings": extrapolated["id_embeddings_s"],
            "landmark grads": extrapolated["id_landmark_gradients_s"],
            "target grads": extrapolated["id_target_gradients_s"],
            "propagation": extrapolated["id_propagation_s"],
            "selection": extrapolated["id_selection_s"],
        },
        {
            "method": "exact gradients",
            f"N = {n} (s)": extrapolated["exact_total_s"],
            "embeddings": 0.0,
            "landmark grads": extrapolated["exact_pool_gradients_s"],
            "target grads": extrapolated["exact_target_gradients_s"],
            "propagation": 0.0,
            "selection": extrapolated["exact_selection_s"],
        },
    ]
    agreement = [
        {"target": t, "Spearman ρ": rho, "top-10% overlap": f["top10_overlap_per_target"][t]}
        for t, rho in f["spearman_vs_exact_per_target"].items()
    ]
    figures = [
        {
            f"speedup_vs_exact (N = {n})": f["speedup_vs_exact"],
            f"at measured N = {f['measured_pool_n']}": f["speedup_vs_exact_at_measured_n"],
            "asymptotic (N → ∞)": f["speedup_vs_exact_asymptotic"],
            "spearman_vs_exact": f["spearman_vs_exact"],
            "exact grad / embedding per sample": f["exact_gradient_over_embedding_per_sample"],
        }
    ]
    text = "Measured stages:\n\n" + _table(stages)
    text += f"\nExtrapolated to N = {n} (landmark columns hold the pool gradients for exact):\n\n" + _table(
        totals
    )
    text += f"\nHeld-out rank agreement ({child['num_holdout']} samples, never landmarks):\n\n" + _table(
        agreement
    )
    text += "\nHeadline figures:\n\n" + _table(figures)
    if child.get("gradient_breakdown"):
        b = child["gradient_breakdown"]
        text += f"\nWhere an exact gradient's time goes (median over {b['samples']} samples):\n\n" + _table(
            [
                {
                    "backward s": b["backward_s_median"],
                    "reduce (norm + SRHT) s": b["reduce_s_median"],
                    "reduce share": b["reduce_share"],
                    "reduce, 4 at once, s per gradient": b["reduce_s_per_gradient_batched_4"],
                    "gradient dims": b["reduced_dim"],
                }
            ]
        )
    return text


def sweep_section(record: dict[str, Any]) -> str:
    rows = [
        {
            "L": r["L"],
            "Spearman ρ (mean)": r["spearman_mean"],
            "per target": ", ".join(fmt(x) for x in r["spearman_per_target"]),
            "top-10% overlap": r["top10_overlap_mean"],
            "landmark grads s": r["landmark_gradient_s"],
            "propagation s": r["propagation_s"],
            "total s": r["total_s"],
        }
        for r in record["rows"]
    ]
    return _table(rows)


def scaling_section(record: dict[str, Any]) -> str:
    f = record["figures"]
    rows = []
    for r in record["rows"]:
        rows.append(
            {
                "N": r["N"],
                "tokenize s": r["tokenize_s"],
                "embeddings s": r["embeddings_s"],
                "landmark grads s": r["landmark_gradients_s"],
                "target grads s": r["target_gradients_s"],
                "propagation s": r["propagation_s"],
                "selection s": r["selection_s"],
                "total s": r["total_s"],
                "N-dependent ms/sample": 1000 * f["n_dependent_s_per_sample_by_n"][str(r["N"])],
                "peak RSS GiB": r["peak_rss_gib"],
            }
        )
    ratios = [
        {
            "peak RSS largest / smallest": f["peak_rss_ratio_largest_over_smallest"],
            **{
                f"{k} per-sample ratio": v
                for k, v in f["per_sample_time_ratio_largest_over_smallest"].items()
            },
        }
    ]
    return _table(rows) + "\n" + _table(ratios)


def propagation_section(record: dict[str, Any]) -> str:
    f = record["figures"]
    row = {
        "fit s": f["krr_fit_s"],
        "predict, all targets in one pass, s": f["krr_predict_s"],
        "total s": f["krr_total_s"],
        "fit + one pass per target s": f["krr_per_target_passes_s"],
        "peak RSS GiB": f["peak_rss_gib"],
        "N×L×targets float64 GiB": f["dense_n_l_targets_float64_gib"],
    }
    if "float32_kernel_predict_over_float64" in f:
        row["float32 kernel / float64 time"] = f["float32_kernel_predict_over_float64"]
        row["float32 max abs diff / std"] = f["float32_kernel_max_abs_diff_over_std"]
    return _table([row])


def gpu_section(record: dict[str, Any]) -> str:
    f = record["figures"]
    return _table(
        [
            {
                "device": f["device"],
                "size": f["size"],
                "jvp_over_kblock_forward": ", ".join(
                    f"{k}: {fmt(v)}" for k, v in f["jvp_over_kblock_forward"].items()
                ),
                "speedup_vs_exact": f["speedup_vs_exact"],
                "spearman_vs_exact": f["spearman_vs_exact"],
            }
        ]
    )


def embed_dtype_section(record: dict[str, Any]) -> str:
    p = record["params"]
    head = f"Pool N = {p['pool_size']}, L = {p['num_landmarks']}, {p['num_holdout']} held out.\n\n"
    rows = [
        {
            "dtype": r["dtype"],
            "embedding s/sample": r["embed_s_per_sample"],
            "Spearman ρ (mean)": r["spearman_mean"],
            "per target": ", ".join(fmt(x) for x in r["spearman_per_target"]),
            "top-10% overlap": r["top10_overlap_mean"],
        }
        for r in record["rows"]
    ]
    return head + _table(rows)


SECTIONS = {
    "jvp_cost": ("1. JVP cost", jvp_section),
    "end_to_end": ("2. End-to-end selection, landmarks vs exact", end_to_end_section),
    "landmark_sweep": ("3. Landmark sweep", sweep_section),
    "scaling": ("4. Scaling", scaling_section),
    "propagation": ("5. Propagation at scale", propagation_section),
    "gpu": ("6. GPU script", gpu_section),
    "embed_dtype": ("Extra: bfloat16 embeddings", embed_dtype_section),
}


def render(results: Path) -> str:
    parts = []
    suite = _load(results, "suite")
    if suite:
        parts.append(
            f"Suite: profile `{suite['profile']}`, commit `{suite['git_commit']}`, started {suite['started_utc']}, "
            f"{suite['seconds']:.0f} s in all ("
            + ", ".join(f"{n} {s['status']} {s['seconds']:.0f} s" for n, s in suite["benchmarks"].items())
            + ").\n"
        )
    for name, (title, section) in SECTIONS.items():
        record = _load(results, name)
        if record is None:
            parts.append(f"### {title}\n\nNot in this run.\n")
            continue
        load = record["machine"].get("load_average")
        load_text = ", ".join(f"{x:.2f}" for x in load) if load else "n/a"
        parts.append(
            f"### {title}\n\n`{name}.json`, {record['created_utc']}, {record['seconds']:.0f} s, "
            f"load average at start {load_text}.\n\n" + section(record)
        )
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR))
