"""The second-order model's budget curve on the default model and the built-in pool, against real fine-tunes.

For one target of the main job: the landmarks' ``p`` and ``Q`` (the paper's model of one step, real scale,
``order: second``), lifted to the pool by the shared KRR coefficients (landmark rows exact), then

* the curve: the model's predicted change of the mean dev loss for the best weights at each budget of a grid
  (``steps.qp.budget_curve``), at the recipe's ``η`` and at ``η × steps`` (the fine-tune's total step length,
  a one-step stand-in for the 16 steps the fine-tune takes), with first order's prediction beside it;
* how far second order moves the selection from first order's top-k at each budget and ``η``
  (overlap of the supports, and the ratio of the quadratic to the linear term at the QP's weights);
* measured: the recipe's fine-tune (unweighted, as the main job) on the second-order and the first-order subsets
  at three budgets, each from a fresh copy of the base model, and the change of the mean dev and test loss.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.studies.budget_curve --work /tmp/budget-curve`` (writes
``benchmarks/results/budget_curve.json``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

from benchmarks.common import (
    RESULTS_DIR,
    builtin_data,
    machine_info,
    print_table,
    tokenized,
    utc_now,
    write_json_atomic,
)


def mean_loss(model, tokenizer, examples) -> float:
    import torch

    from idistill_core.data.batch import batches_for
    from idistill_core.steps.second_order import sample_losses

    with torch.no_grad():
        losses = [sample_losses(model, b) for b in batches_for(examples, tokenizer, 8)]
    return float(torch.cat(losses).mean())


def run(work: Path, target: str, landmarks: int, grid: list[int], measured: list[int], seed: int) -> dict:
    import torch

    from idistill_core.models.loading import load_model
    from idistill_core.pipeline.embeddings import embed_pool, open_store
    from idistill_core.pipeline.landmarks import choose_landmarks
    from idistill_core.pipeline.propagation import shared_coefficients
    from idistill_core.pipeline.recipe import resolve_recipe
    from idistill_core.pipeline.second_order import _ExactRows, second_order_terms_for, terms_from_arrays
    from idistill_core.project.settings import load_settings
    from idistill_core.steps.pool_qp import pool_terms
    from idistill_core.steps.qp import budget_curve, first_order_weights, solve_qp
    from idistill_core.training.finetune import finetune

    torch.set_num_threads(1)
    settings = load_settings("profiles/default.yaml")
    loaded = load_model(settings.model, attn_implementation="eager", cache_dir=settings.cache_dir)
    model, tok = loaded.model, loaded.tokenizer
    recipe = dataclasses.replace(settings.recipe, order="second", num_landmarks=landmarks, seed=seed)
    recipe, _ = resolve_recipe(recipe, model)
    data = builtin_data(work, settings.pool.builtin_size, settings.pool.builtin_seed)
    pool = tokenized(data / "pool.jsonl", tok, recipe.max_length)
    dev = tokenized(data / "targets" / target / "dev.jsonl", tok, recipe.max_length)
    test = tokenized(data / "targets" / target / "test.jsonl", tok, recipe.max_length)
    pool_ids = list(pool["sample_id"])
    n = len(pool_ids)
    timings = {}
    start = time.perf_counter()
    store = open_store(work / "lancedb", "embeddings", loaded.fingerprint, recipe, model.config.hidden_size)
    embed_pool(model, tok, pool, store, recipe.embed)
    lm_ids, _ = choose_landmarks(pool_ids, landmarks, 0, seed, recipe.landmarks)
    coefficients, _ = shared_coefficients(store, pool_ids, lm_ids, recipe.propagate)
    timings["embeddings_and_coefficients"] = time.perf_counter() - start
    start = time.perf_counter()
    second = second_order_terms_for(model, tok, pool, dev, lm_ids, recipe)
    timings["second_order_terms"] = time.perf_counter() - start
    terms = terms_from_arrays(second)
    table = _ExactRows(coefficients, lm_ids)
    p_pool, quad = pool_terms(table, terms)
    ids = quad.ids
    p_first = quad.matvec(terms.p_first.to(torch.float64))
    steps = settings.finetune.max_steps
    etas = {"lr": recipe.lr, "lr_x_steps": recipe.lr * steps}
    curves, moves = {}, []
    for name, eta in etas.items():
        curves[name] = [dataclasses.asdict(pt) for pt in budget_curve(p_pool, quad, eta, grid, float(n), p_first=p_first)]
        for k in grid:
            w = solve_qp(p_pool, quad, eta, k, float(n)).weights
            top = set(torch.topk(first_order_weights(p_pool, k, float(n)), k).indices.tolist())
            support = set(torch.topk(w, k).indices.tolist())
            linear = float(p_pool @ w)
            quadratic = 0.5 * eta * float(w @ quad(w))
            moves.append({"eta": name, "k": k, "overlap_with_first_order": len(top & support) / k,
                          "quadratic_over_linear": quadratic / linear if linear else float("nan")})
    base_dev, base_test = mean_loss(model, tok, dev), mean_loss(model, tok, test)
    rows = []
    for k in measured:
        for order, eta in (("second", etas["lr_x_steps"]), ("first", 0.0)):
            w = solve_qp(p_pool, quad, eta, k, float(n)).weights if order == "second" else first_order_weights(p_pool, k, float(n))
            chosen = sorted(torch.topk(w, k).indices.tolist())
            subset = pool.select(sorted(pool_ids.index(ids[i]) for i in chosen))
            tuned = copy.deepcopy(model)
            begin = time.perf_counter()
            finetune(tuned, tok, subset, settings.finetune)
            rows.append({
                "k": k, "order": order, "dev_change": mean_loss(tuned, tok, dev) - base_dev,
                "test_change": mean_loss(tuned, tok, test) - base_test, "finetune_s": time.perf_counter() - begin,
                "predicted_lr": next(p for p in curves["lr"] if p["k"] == k)["predicted_change"] if k in grid else None,
                "predicted_lr_x_steps": next(p for p in curves["lr_x_steps"] if p["k"] == k)["predicted_change"]
                if k in grid else None,
            })
            del tuned
    print_table("measured change of the mean target loss after the fine-tune", rows)
    print_table("second order vs first order supports", moves)
    return {"target": target, "landmarks": landmarks, "seed": seed, "pool": n, "etas": etas, "curves": curves,
            "moves": moves, "measured": rows, "base_dev_loss": base_dev, "base_test_loss": base_test,
            "q_noise": terms.q_noise, "timings": timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/idistill-budget-curve"))
    parser.add_argument("--target", default="arith")
    parser.add_argument("--landmarks", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default="10,25,50,100,150,250,400,600")
    parser.add_argument("--measured", default="50,150,400")
    args = parser.parse_args(argv)
    record = run(args.work, args.target, args.landmarks, [int(x) for x in args.grid.split(",")],
                 [int(x) for x in args.measured.split(",")], args.seed)
    record.update(machine=machine_info(), finished_utc=utc_now())
    write_json_atomic(RESULTS_DIR / "budget_curve.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
