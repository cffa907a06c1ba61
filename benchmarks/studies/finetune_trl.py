"""One fine-tune with the default profile's recipe on the default model: TRL path vs the old loop, same run.

    nice python -m benchmarks.finetune_trl [--steps 16] [--out benchmarks/results/finetune_trl.json]

Both start from the same base weights and the same 8*steps pool rows (tokenized as the pipeline does);
reported: seconds per run, the ratio, both loss curves, machine (CPU model, amx/avx512_bf16 flags, load).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch


def _cpu() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), ""
    )
    flags = next((line for line in text.splitlines() if line.startswith("Flags")), "")
    return {
        "model": model,
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def main() -> None:
    from benchmarks import legacy_finetune_loop as legacy
    from idistill_core import train
    from idistill_core.builtin import write_builtin
    from idistill_core.data import load_rows, tokenize_rows
    from idistill_core.models import load_model
    from idistill_core.settings import load_settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/finetune_trl.json")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating; best is compared")
    args = parser.parse_args()
    s = load_settings()
    ft = s.finetune
    steps = args.steps or ft.max_steps
    loaded = load_model(s.model)
    with tempfile.TemporaryDirectory() as tmp:
        write_builtin(tmp, pool_size=ft.batch_size * steps, seed=0, dev_size=2, test_size=2)
        examples = [
            dict(e)
            for e in tokenize_rows(
                load_rows(f"{tmp}/pool.jsonl"), loaded.tokenizer, s.recipe.max_length
            ).examples
        ]
    recipe = {
        "lr": ft.lr,
        "max_steps": steps,
        "batch_size": ft.batch_size,
        "warmup_ratio": ft.warmup_ratio,
        "precision": train.resolve_precision(ft.precision, loaded.model),
    }
    results = {}
    names = [f"{kind}_{i}" for i in range(args.repeats) for kind in ("old_loop", "trl")]
    for name in names:
        model = copy.deepcopy(loaded.model)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        if name.startswith("trl"):
            r = train.finetune(model, loaded.tokenizer, examples, train.FinetuneConfig(**recipe))
        else:
            r = legacy.finetune(model, loaded.tokenizer, examples, legacy.FinetuneConfig(**recipe))
        results[name] = {
            "seconds": time.perf_counter() - start,
            "losses": r.losses,
            "tokens": r.tokens,
            "load_avg_1m_before": load_before,
            "load_avg_1m_after": os.getloadavg()[0],
        }
        print(name, round(results[name]["seconds"], 1), "s", flush=True)
        del model
    trl_s = min(v["seconds"] for k, v in results.items() if k.startswith("trl"))
    old_s = min(v["seconds"] for k, v in results.items() if k.startswith("old_loop"))
    report = {
        "benchmark": "finetune_trl",
        "model": s.model,
        "recipe": recipe,
        "examples": len(examples),
        "trl_over_old_loop_best": trl_s / old_s,
        "max_rel_loss_diff": max(
            abs(a - b) / abs(b) for a, b in zip(results["trl_0"]["losses"], results["old_loop_0"]["losses"])
        ),
        "runs": results,
        "cpu": _cpu(),
        "nice": os.nice(0),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
