"""Does the second order pick better on real targets? On-target share of first and second order, same landmarks.

On the real benchmark of ``benchmarks.quality`` (its cached pool gradients, embeddings and target features), for
each target and landmark draw: the shared landmarks and their first-order values come from the cached gradients
(``methods.id.propagate_and_select``, the library's code); the second order's landmark terms ``p`` and ``Q`` are
computed on the default model (``pipeline.second_order.second_order_terms_for``: real Hessian-vector products, the
default recipe's sketch), lifted by the same KRR coefficients and solved by the pool QP
(``pipeline.second_order.qp_outcome``), at the recipe's ``η`` and at ``η × finetune.max_steps`` (the fine-tune's
whole step length, where the quadratic term weighs in). Compared on the same landmarks: the paper's first order
(no centring, no refinement: the first-order limit of this second-order model, so the overlap of the two subsets
says what the curvature changed), first order centred without refinement, and the default first order.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.studies.second_order_quality`` (after ``benchmarks.quality.features``);
writes ``benchmarks/results/second_order_quality.json``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table
from benchmarks.quality.run import cached_store, live_setup, share, study_main


def run(work: Path, data: Path, targets: list[str], seeds: list[int], num_landmarks: int, budget: int) -> dict:
    import datasets
    import torch

    from idistill_core.methods.base import SelectionContext
    from idistill_core.methods.id import propagate_and_select
    from idistill_core.pipeline.recipe import resolve_recipe
    from idistill_core.pipeline.second_order import qp_outcome, second_order_terms_for

    live = live_setup(work, data)
    pool_ids, source_of, arrays, loaded, pool = live.pool_ids, live.source_of, live.arrays, live.loaded, live.pool
    grads = arrays["pool_grads"]
    row = {s: i for i, s in enumerate(pool_ids)}
    steps = live.settings.finetune.max_steps

    def gradients(ids: list[str]) -> torch.Tensor:
        return torch.from_numpy(grads[[row[s] for s in ids]])

    rows = []
    with cached_store(pool_ids, arrays) as store:
        for target in targets:
            dev = live.dev(data, target)
            t_grads, t_emb = torch.from_numpy(arrays[f"target_grads/{target}"]), arrays[f"target_emb/{target}"]
            for seed in seeds:
                recipe = dataclasses.replace(live.settings.recipe, num_landmarks=num_landmarks, seed=seed,
                                             max_length=live.max_length)
                recipe, _ = resolve_recipe(recipe, loaded.model)
                ctx = SelectionContext(None, None, "cached", datasets.Dataset.from_dict({"sample_id": pool_ids}),
                                       datasets.Dataset.from_dict({"sample_id": list(dev["sample_id"])}), budget,
                                       recipe, source_of=source_of)
                terms: dict = {}

                def second(landmark_ids: list[str], recipe=recipe, dev=dev, terms=terms) -> dict:
                    start = time.perf_counter()
                    terms.update(second_order_terms_for(loaded.model, loaded.tokenizer, pool, dev, landmark_ids,
                                                        dataclasses.replace(recipe, order="second")))
                    terms["seconds"] = time.perf_counter() - start
                    return terms

                # the paper's first order (no centring: the second-order model is the real step's, uncentred)
                paper = dataclasses.replace(ctx, recipe=dataclasses.replace(recipe, center=False))
                first_paper = propagate_and_select(paper, store, t_grads, gradients, None, None)
                first_plain = propagate_and_select(ctx, store, t_grads, gradients, None, None)
                first_default = propagate_and_select(ctx, store, t_grads, gradients, t_emb, None)
                # the second order on the same landmarks (same seed, same draw) and the same coefficient table
                second_report = propagate_and_select(ctx, store, t_grads, gradients, None, second)
                record = {"target": target, "seed": seed,
                          "first_paper": share(first_paper.outcome.selected, source_of, target),
                          "first_no_refinement": share(first_plain.outcome.selected, source_of, target),
                          "first_default": share(first_default.outcome.selected, source_of, target),
                          "second_lr": share(second_report.outcome.selected, source_of, target),
                          "q_noise": float(terms["q_noise"][0]), "second_order_s": terms["seconds"]}
                coefficients = _coefficients_of(store, pool_ids, second_report, recipe)
                longer = dict(terms, lr=np.array([recipe.lr * steps]))
                wide = qp_outcome(None, coefficients, longer, budget, recipe, landmark_ids=coefficients.landmark_ids,
                                  source_of=source_of)
                record["second_lr_x_steps"] = share(wide.selected, source_of, target)
                overlap = set(second_report.outcome.selected) & set(first_paper.outcome.selected)
                record["second_lr_overlap_with_first"] = len(overlap) / budget
                record["second_lr_x_steps_overlap_with_first"] = (
                    len(set(wide.selected) & set(first_paper.outcome.selected)) / budget)
                rows.append(record)
                print(record, flush=True)
    print_table(f"on-target share of {budget} picks, L = {num_landmarks}", rows)
    return {"rows": rows, "features": live.features.name, "budget": budget, "landmarks": num_landmarks, "seeds": seeds,
            "finetune_steps": steps}


def _coefficients_of(store, pool_ids, report, recipe):
    """The shared coefficient table the report's selection used (``shared_coefficients`` reuses it by content)."""
    from idistill_core.pipeline.landmarks import choose_landmarks
    from idistill_core.pipeline.propagation import shared_coefficients

    lm_ids, _ = choose_landmarks(pool_ids, recipe.num_landmarks, recipe.num_holdout, recipe.seed, recipe.landmarks,
                                 store.read(pool_ids) if recipe.landmarks.needs_embeddings else None)
    table, built = shared_coefficients(store, pool_ids, lm_ids, recipe.propagate)
    assert built.rows_computed == 0, "the study expected the table the selection built"
    return table


def main(argv: list[str] | None = None) -> int:
    return study_main(argv, __doc__, run, "second_order_quality.json", targets="arc,math,gsm8k_cot", seeds="0,1")


if __name__ == "__main__":
    raise SystemExit(main())
