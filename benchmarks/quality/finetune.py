"""The goal behind the on-target share: does the subset train the model better for the target?

For each target of the real benchmark, the subsets ``benchmarks.quality.run`` compares (ID with the default
recipe, ID with the paper's, exact influence, RDS+, random; one landmark draw each) are fine-tuned into fresh
copies of the default model with the main job's fine-tune (unweighted, ``profiles/default.yaml``), and the mean
loss on the target's held-out test rows is measured before and after. Lower is better; the on-target share
only says where a subset's rows come from, this says what they do.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.quality.finetune --targets math,arc,gsm8k_cot`` (after
``benchmarks.quality.features``); writes ``benchmarks/results/quality_finetune.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, machine_info, print_table, utc_now, write_json_atomic
from benchmarks.quality.run import (
    RECIPES,
    cached_stores,
    exact_selection,
    load_features,
    propagate_cached,
    recipe_for,
    share,
)


def subsets(features: Path, target: str, budget: int, num_landmarks: int, seed: int) -> dict[str, list[str]]:
    """The picks of every compared method for one target (library code on the cached arrays)."""
    import datasets
    import torch

    from idistill_core.methods.base import SelectionContext
    from idistill_core.methods.random import random_scores
    from idistill_core.methods.rds import rds_scores_from_features
    from idistill_core.pipeline.selection import select_samples

    meta, arrays = load_features(features)
    pool_ids = list(meta["pool_ids"])
    row = {s: i for i, s in enumerate(pool_ids)}
    grads = arrays["pool_grads"]
    t_grads = arrays[f"target_grads/{target}"]
    out = {
        "exact": exact_selection(pool_ids, meta["sources"], grads, t_grads, budget, True, "mean").selected,
        "rds": select_samples(pool_ids, rds_scores_from_features(arrays["pool_rds"], arrays[f"target_rds/{target}"]),
                              budget, "rr", seed=0, method="rds", fixed_order=True).selected,
        "random": select_samples(pool_ids, random_scores(pool_ids, seed), budget, method="random").selected,
    }
    with cached_stores(pool_ids, arrays) as stores:
        for name, changes in RECIPES.items():
            recipe = recipe_for(changes, num_landmarks=num_landmarks, seed=seed)
            ctx = SelectionContext(None, None, "cached", datasets.Dataset.from_dict({"sample_id": pool_ids}),
                                   datasets.Dataset.from_dict({"sample_id": meta["targets"][target]["ids"]}), budget,
                                   recipe)
            report = propagate_cached(ctx, stores, arrays, target, lambda ids: torch.from_numpy(grads[[row[s] for s in ids]]))
            out[f"id-{name}"] = report.outcome.selected
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from idistill_core.data.batch import batches_for
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.data.rows import load_rows
    from idistill_core.models.loading import load_model
    from idistill_core.project.settings import load_settings
    from idistill_core.steps.second_order import sample_losses
    from idistill_core.training.finetune import finetune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(".idistill/quality"))
    parser.add_argument("--data", type=Path, default=Path(".idistill/realdata"))
    parser.add_argument("--targets", default="arc,math,gsm8k_cot")
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--landmarks", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-rows", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    features = max(args.work.glob("features-*"), key=lambda p: p.stat().st_mtime)
    meta, _ = load_features(features)
    max_length = meta["recipe"]["max_length"]
    settings = load_settings("profiles/default.yaml")
    loaded = load_model(settings.model, attn_implementation="eager", cache_dir=settings.cache_dir)
    pool_rows = load_rows(str(args.data / "pool.jsonl"), fmt="chat")
    pool = tokenize_rows(pool_rows, loaded.tokenizer, max_length).examples
    source_of = dict(zip(meta["pool_ids"], meta["sources"], strict=True))
    position = {s: i for i, s in enumerate(pool["sample_id"])}

    def test_loss(model, examples) -> float:
        with torch.no_grad():
            return float(torch.cat([sample_losses(model, b) for b in batches_for(examples, loaded.tokenizer, 8)]).mean())

    rows = []
    started = utc_now()

    def record(finished: bool) -> None:
        write_json_atomic(RESULTS_DIR / "quality_finetune.json", {
            "rows": rows, "features": features.name, "budget": args.budget, "landmarks": args.landmarks,
            "seed": args.seed, "finetune": dataclasses.asdict(settings.finetune), "machine": machine_info(),
            "started_utc": started, "finished_utc": utc_now() if finished else None,
        })

    for target in args.targets.split(","):
        test = tokenize_rows(load_rows(str(args.data / "targets" / target / "test.jsonl"), fmt="chat", limit=args.test_rows),
                             loaded.tokenizer, max_length).examples
        base = test_loss(loaded.model, test)
        for method, picked in subsets(features, target, args.budget, args.landmarks, args.seed).items():
            tuned = copy.deepcopy(loaded.model)
            start = time.perf_counter()
            finetune(tuned, loaded.tokenizer, pool.select(sorted(position[s] for s in picked)), settings.finetune)
            rows.append({"target": target, "method": method, "on_target": share(picked, source_of, target),
                         "test_loss": test_loss(tuned, test), "base_test_loss": base,
                         "seconds": time.perf_counter() - start})
            rows[-1]["change"] = rows[-1]["test_loss"] - base
            print(json.dumps(rows[-1]), flush=True)
            del tuned
            record(finished=False)  # every finished fine-tune is kept if the run is stopped
    print_table(f"mean test loss after the main job's fine-tune on {args.budget} picks (lower is better)", rows,
                ["target", "method", "on_target", "base_test_loss", "test_loss", "change"])
    record(finished=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
