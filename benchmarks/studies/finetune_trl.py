"""One fine-tune with the default profile's recipe on the default model: TRL path vs the old loop, same run.

    nice python -m benchmarks.studies.finetune_trl [--steps 16] [--out benchmarks/results/finetune_trl.json]

Both start from the same base weights and the same 8*steps pool rows (tokenized as the pipeline does);
reported: seconds per run, the ratio, both loss curves, machine (``benchmarks.common.machine_info``), load.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info, write_json_atomic


def main() -> None:
    from benchmarks.studies import legacy_finetune_loop as legacy
    from idistill_core.data.builtin import write_builtin
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.data.rows import load_rows
    from idistill_core.models.loading import load_model
    from idistill_core.project.settings import load_settings
    from idistill_core.training import finetune as train

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
        "machine": machine_info(),
        "nice": os.nice(0),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
