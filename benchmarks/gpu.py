"""Benchmark 6: benchmarks 1 and 2 on a GPU at a larger model size, for when a GPU machine is lent.

    python -m benchmarks.gpu                      # on a GPU machine: random-llama-1b on cuda, sizes "gpu"
    python -m benchmarks.gpu --device cpu --size cpu-check   # the same code on CPU at tiny sizes

``random-llama-1b`` is Llama-3.2-1B's shape with seeded random weights and the tiny byte-level tokenizer, so
the script needs no download (the GPU machine has no network) and no cached model; pass ``--model`` with a
local model directory to use a trained one. Results go to ``gpu_jvp_cost.json`` and ``gpu_end_to_end.json``
(same figures as benchmarks 1 and 2) and ``gpu.json`` (a summary). The suite runs the ``cpu-check`` size on
every run so this script cannot rot.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import end_to_end, jvp_cost
from benchmarks.common import RESULTS_DIR, machine_info, write_result
from benchmarks.profiles import GPU_SIZES

NAME = "gpu"


def run(params: dict[str, Any], results_dir: Path, work_dir: Path, profile: str, machine: dict) -> dict:
    start = time.perf_counter()
    device = params.get("device") or _default_device()
    sizes = GPU_SIZES[params["size"]]
    overrides = {"model": params["model"]} if params.get("model") else {}
    jvp_params = {**sizes["jvp_cost"], **overrides, "device": device}
    e2e_params = {**sizes["end_to_end"], **overrides, "device": device}
    jvp = jvp_cost.run(jvp_params, results_dir, work_dir, profile, machine, name="gpu_jvp_cost")
    e2e_work = Path(work_dir) / "gpu"
    e2e_work.mkdir(parents=True, exist_ok=True)
    e2e = end_to_end.run(e2e_params, results_dir, e2e_work, profile, machine, name="gpu_end_to_end")
    figures = {
        "device": device,
        "size": params["size"],
        "jvp_over_kblock_forward": jvp["jvp_over_kblock_forward"],
        "jvp_over_full_forward": jvp["jvp_over_full_forward"],
        "speedup_vs_exact": e2e["speedup_vs_exact"],
        "spearman_vs_exact": e2e["spearman_vs_exact"],
    }
    notes = ["details in gpu_jvp_cost.json and gpu_end_to_end.json"]
    write_result(
        results_dir,
        NAME,
        profile,
        {**params, "device": device},
        figures,
        [],
        notes,
        machine,
        time.perf_counter() - start,
    )
    return figures


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument(
        "--size", default=None, choices=sorted(GPU_SIZES), help="gpu on cuda, cpu-check on cpu"
    )
    parser.add_argument("--model", default=None, help="model spec (default: random-llama-1b / tiny-llama)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    device = args.device or _default_device()
    size = args.size or ("gpu" if device.startswith("cuda") else "cpu-check")
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="idistill-bench-work-") as work:
        run(
            {"size": size, "device": device, "model": args.model},
            args.results_dir,
            Path(work),
            size,
            machine_info(),
        )


if __name__ == "__main__":
    main()
