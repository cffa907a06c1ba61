"""What does ``optimizer: adam`` change on real targets? GD and Adam-preconditioned landmark influence, same landmarks.

On the real benchmark of ``benchmarks.quality`` (its pool, targets and cached JVP embeddings), the default recipe's
``id`` selection runs twice through the library (``methods.id.propagate_and_select``): with ``optimizer: gd`` (the
base model's gradients) and with ``optimizer: adam`` (the paper's §1.6: a warmed-up copy of the model, landmark
gradients ⊙ its Adam factor; ``SelectionContext.gradient_model``). Gradients are computed live with the current
sketch (never mixed with the cached ones, which an older sketch made) and memoised per optimizer, so a landmark
shared by two targets is computed once. Reported: on-target share of each and the overlap of the two subsets.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.studies.adam_quality`` (after ``benchmarks.quality.features``);
writes ``benchmarks/results/adam_quality.json``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from benchmarks.common import print_table
from benchmarks.quality.run import cached_store, live_setup, share, study_main


def run(work: Path, data: Path, targets: list[str], seeds: list[int], num_landmarks: int, budget: int) -> dict:
    import datasets
    import torch

    from idistill_core.methods.base import SelectionContext
    from idistill_core.methods.id import propagate_and_select
    from idistill_core.pipeline.gradients import compute_gradients
    from idistill_core.pipeline.recipe import resolve_recipe

    live = live_setup(work, data)
    pool_ids, source_of, arrays, loaded, pool = live.pool_ids, live.source_of, live.arrays, live.loaded, live.pool
    settings, max_length = live.settings, live.max_length
    devs = {t: live.dev(data, t) for t in targets}
    rows, timings = [], {}
    with cached_store(pool_ids, arrays) as store:
        picks: dict[tuple, list[str]] = {}
        for optimizer in ("gd", "adam"):
            recipe = dataclasses.replace(settings.recipe, num_landmarks=num_landmarks, optimizer=optimizer,
                                         max_length=max_length)
            recipe, _ = resolve_recipe(recipe, loaded.model)
            base = SelectionContext(loaded.model, loaded.tokenizer, "cached", pool, None, budget, recipe)
            start = time.perf_counter()
            grad_model, preconditioner = base.gradient_model()
            timings[f"{optimizer}_warmup"] = time.perf_counter() - start
            memo: dict[str, torch.Tensor] = {}

            def gradients(ids: list[str], grad_model=grad_model, preconditioner=preconditioner, memo=memo,
                          recipe=recipe) -> torch.Tensor:
                missing = [s for s in ids if s not in memo]
                if missing:
                    got = compute_gradients(grad_model, loaded.tokenizer, pool, missing, recipe.gradients, preconditioner)
                    memo.update(zip(got.sample_ids, got.grads, strict=True))
                return torch.stack([memo[s] for s in ids])

            start = time.perf_counter()
            for target in targets:
                dev = devs[target]
                t_grads = compute_gradients(grad_model, loaded.tokenizer, dev, None, recipe.gradients).grads
                for seed in seeds:
                    seeded = dataclasses.replace(recipe, seed=seed)
                    ctx = SelectionContext(None, None, "cached", datasets.Dataset.from_dict({"sample_id": pool_ids}),
                                           datasets.Dataset.from_dict({"sample_id": list(dev["sample_id"])}), budget,
                                           seeded, source_of=source_of)
                    report = propagate_and_select(ctx, store, t_grads, gradients, arrays[f"target_emb/{target}"])
                    picks[(optimizer, target, seed)] = report.outcome.selected
            timings[f"{optimizer}_selection"] = time.perf_counter() - start
            timings[f"{optimizer}_gradients"] = len(memo)
        for target in targets:
            for seed in seeds:
                gd, adam = picks[("gd", target, seed)], picks[("adam", target, seed)]
                rows.append({"target": target, "seed": seed, "gd": share(gd, source_of, target),
                             "adam": share(adam, source_of, target), "overlap": len(set(gd) & set(adam)) / budget})
    print_table(f"on-target share of {budget} picks, default recipe, L = {num_landmarks}: GD vs Adam", rows)
    return {"rows": rows, "timings": timings, "features": live.features.name, "budget": budget,
            "landmarks": num_landmarks, "seeds": seeds, "warmup": dataclasses.asdict(settings.recipe.warmup)}


def main(argv: list[str] | None = None) -> int:
    return study_main(argv, __doc__, run, "adam_quality.json", targets="arc,math", seeds="0")


if __name__ == "__main__":
    raise SystemExit(main())
