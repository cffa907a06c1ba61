"""Projected wall time and cost of embeddings and landmark gradients for Tulu V2 (5.8M) on 8 GPUs.

    python -m benchmarks.studies.ray_projection [--tokens 700] [--mfu 0.3] [--gpu-tflops 989] [--usd-per-gpu-hour 2.5]

A FLOP model anchored on ratios measured in this repo (no GPU was lent, so no GPU rate is measured):

- embedding = ``r`` x a forward through the first k = 4 blocks, ``r`` = ``jvp_cost.figures.jvp_over_kblock_forward``
  (measured, SmolLM2-135M, CPU; forward-mode AD with m = 2 tangents costs about 1 + 2m primal passes anywhere);
- landmark gradient = 3 x a full forward (forward + backward) divided by (1 - reduce share), the share of the
  SRHT reduction measured in ``end_to_end.figures.exact_gradient_reduce_share``;
- forward FLOPs = 2 x parameters x tokens; achieved rate = GPU peak bf16 dense x MFU (assumed);
- Ray's steady-state overhead from ``ray_overhead.figures.ray_steady_overhead_ratio_1_thread`` (measured here,
  floored at 1).

Writes ``ray_projection.json`` with every input and the rows of the table.
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import RESULTS_DIR, machine_info, print_table, write_result

TULU_V2 = 5_800_000
GPUS = 8
# (name, decoder layers, params per decoder layer, LM-head params): Llama-3.2-1B (tied head) and Llama-2-7B
MODELS = [
    ("Llama-3.2-1B", 16, 2048 * 2048 * 2 + 2048 * 512 * 2 + 3 * 2048 * 8192, 128256 * 2048),
    ("Llama-2-7B", 32, 4 * 4096 * 4096 + 3 * 4096 * 11008, 32000 * 4096),
]


def _figure(name: str, key: str) -> float:
    return float(json.loads((RESULTS_DIR / f"{name}.json").read_text())["figures"][key])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens", type=float, default=700.0, help="mean tokens per Tulu V2 sample (assumed)"
    )
    parser.add_argument("--mfu", type=float, default=0.30, help="model FLOP utilisation (assumed)")
    parser.add_argument(
        "--gpu-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100/H200 SXM)"
    )
    parser.add_argument("--usd-per-gpu-hour", type=float, default=2.5)
    parser.add_argument("--landmarks", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args(argv)
    begin = time.perf_counter()

    r = float(
        next(
            iter(
                json.loads((RESULTS_DIR / "jvp_cost.json").read_text())["figures"][
                    "jvp_over_kblock_forward"
                ].values()
            )
        )
    )
    reduce_share = _figure("end_to_end", "exact_gradient_reduce_share")
    ray_overhead = max(1.0, _figure("ray_overhead", "ray_steady_overhead_ratio_1_thread"))
    rate = GPUS * args.gpu_tflops * 1e12 * args.mfu / ray_overhead
    rows = []
    for name, layers, per_layer, head in MODELS:
        embed_flops = r * 2 * args.blocks * per_layer * args.tokens
        grad_flops = 3 * 2 * (layers * per_layer + head) * args.tokens / (1 - reduce_share)
        for step, per_sample, count in [
            ("embeddings (all N)", embed_flops, TULU_V2),
            (f"landmark gradients (L={args.landmarks})", grad_flops, args.landmarks),
            ("exact gradients (all N, for comparison)", grad_flops, TULU_V2),
        ]:
            seconds = per_sample * count / rate
            rows.append(
                {
                    "model": name,
                    "step": step,
                    "tflop_per_sample": per_sample / 1e12,
                    "samples": count,
                    "total_eflop": per_sample * count / 1e18,
                    "wall_h_8_gpus": seconds / 3600,
                    "wall_h_without_ray_overhead": seconds / ray_overhead / 3600,
                    "gpu_hours": seconds * GPUS / 3600,
                    "usd": seconds * GPUS / 3600 * args.usd_per_gpu_hour,
                }
            )
    print(print_table("Tulu V2 on 8 GPUs (projection)", rows))
    params = {**vars(args), "gpus": GPUS, "pool": TULU_V2, "models": MODELS}
    figures = {
        "jvp_over_kblock_forward": r,
        "gradient_reduce_share": reduce_share,
        "ray_steady_overhead_applied": ray_overhead,
        "cluster_flops_per_s": rate,
    }
    notes = [
        "a projection from a FLOP model and measured ratios, not a measurement on GPUs",
        "attention score FLOPs are left out (small next to the GEMMs at ~700 tokens)",
    ]
    write_result(
        RESULTS_DIR,
        "ray_projection",
        "projection",
        params,
        figures,
        rows,
        notes,
        machine_info(),
        time.perf_counter() - begin,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
