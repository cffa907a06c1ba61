"""Selection quality on real data: exact influence, Influence Distillation (the paper's recipe and ours), RDS+
and random on a real multi-task pool, per target, over landmark draws.

The pool and targets come from public benchmark tasks shipped inside PyPI packages (``benchmarks.quality.realdata``:
short-answer classification tasks beside long-answer ones); the expensive, target-independent arrays (every pool
sample's exact gradient, JVP embedding and RDS+ feature, the targets' gradients and embeddings) come from
``benchmarks.quality.features``. Everything here then runs the library's own code on them:

* ``exact``: every pool sample is a landmark (``steps.influence.landmark_values``, with and without centring,
  ``aggregate`` mean and round-robin) and ``pipeline.selection.select_samples``;
* ``id``: ``methods.id.propagate_and_select`` — landmarks, their values, the shared coefficient table in a real
  LanceDB store, the per-target refinement, keep-exact, selection — with the pool gradients served from the cache
  (a pool sample's gradient is deterministic, so this is the computation a fresh run does);
* ``rds``: ``methods.rds`` scoring and round-robin in fixed target order; ``random``: ``methods.random``.

Metrics per target: the on-target share of the ``budget`` picks (a pick is on target when its ``source`` is the
target's own task), the top-k overlap with the exact selection of the same scoring, and ρ (Spearman) of the
propagated against the exact values on held-out pool samples. The gap splits into *value loss* (1 − exact's
share: what even exact influence picks off task) and *propagation loss* (exact's share − ID's).

Run: ``python -m benchmarks.quality.run`` (after ``benchmarks.quality.realdata`` and ``benchmarks.quality.features``;
``python -m benchmarks.quality`` does all three). Writes ``benchmarks/results/quality.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS_DIR, machine_info, print_table, utc_now, write_json_atomic

RECIPES = {
    # the paper's released code: uniform landmarks, plain cosines, no refinement, the JVP embedding alone
    "paper": {"center": False, "refine_landmarks": 0, "hidden": "none"},
    # the default with the JVP embedding alone as the kernel's input (the default before the final-hidden part)
    "jvp-only": {"hidden": "none"},
    # idistill's default recipe (SelectionRecipe defaults)
    "default": {},
}


def recipe_for(changes: dict, **fields):
    """``SelectionRecipe`` defaults with a ``RECIPES`` entry (``hidden`` goes to ``embed``) and ``fields``."""
    from idistill_core.pipeline.recipe import SelectionRecipe

    changes = dict(changes)
    recipe = SelectionRecipe()
    if "hidden" in changes:
        changes["embed"] = dataclasses.replace(recipe.embed, hidden=changes.pop("hidden"))
    return dataclasses.replace(recipe, **changes, **fields)


def kernel_inputs(arrays: dict, hidden: str, target: str | None = None) -> np.ndarray:
    """The embeddings ``embed_pool`` writes for this ``EmbedConfig.hidden`` (``steps.embed``), from the cache: the
    JVP embedding alone, or the unit JVP embedding beside the unit final-hidden feature (the cached RDS+ feature
    is that same ``pooled_final_hidden``). ``target``: that target's dev rows instead of the pool's."""
    jvp = arrays["pool_emb" if target is None else f"target_emb/{target}"].astype(np.float64)
    if hidden == "none":
        return jvp.astype(np.float32)
    final = arrays["pool_rds" if target is None else f"target_rds/{target}"].astype(np.float64)
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (jvp, final)]
    return np.hstack(unit).astype(np.float32)


@contextlib.contextmanager
def cached_stores(pool_ids: list[str], arrays: dict):
    """``{hidden: cached_store}`` for both ``EmbedConfig.hidden`` values, so recipes of either kind share them."""
    with contextlib.ExitStack() as stack:
        yield {hidden: stack.enter_context(cached_store(pool_ids, arrays, hidden)) for hidden in ("none", "final")}


def propagate_cached(ctx, stores: dict, arrays: dict, target: str, gradients):
    """``methods.id.propagate_and_select`` on the cache: the store of ``ctx.recipe``'s embedding kind, and the
    target's dev embeddings of that kind for its refinement landmarks."""
    import torch

    from idistill_core.methods.id import propagate_and_select

    hidden = ctx.recipe.embed.hidden
    return propagate_and_select(
        ctx, stores[hidden], torch.from_numpy(arrays[f"target_grads/{target}"]), gradients,
        kernel_inputs(arrays, hidden, target) if ctx.recipe.refine_landmarks else None,
    )


def load_features(folder: Path) -> tuple[dict, dict]:
    meta = json.loads((folder / "meta.json").read_text())
    arrays = dict(np.load(folder / "features.npz"))
    return meta, arrays


def exact_selection(pool_ids, sources, grads, target_grads, budget, center: bool, aggregate: str):
    """Exact first-order influence of every pool sample (pool-mean centring when ``center``)."""
    import torch

    from idistill_core.pipeline.selection import select_samples
    from idistill_core.steps.influence import center_gradients, landmark_values

    g, t = torch.from_numpy(grads).double(), torch.from_numpy(target_grads).double()
    if center:
        mean = g.mean(dim=0)
        g, t = center_gradients(g, mean), center_gradients(t, mean)
    return select_samples(pool_ids, landmark_values(g, t, aggregate), budget, aggregate, seed=0, method="exact")


@contextlib.contextmanager
def cached_store(pool_ids: list[str], arrays: dict, hidden: str = "none"):
    """A scratch LanceDB embedding store holding the cached pool embeddings (what ``embed_pool`` would write
    with ``EmbedConfig.hidden = hidden``)."""
    from idistill_core.store.lance import EmbeddingStore, StoreIdentity

    emb = kernel_inputs(arrays, hidden)
    with tempfile.TemporaryDirectory(prefix="idistill-quality-") as scratch:
        store = EmbeddingStore.open(scratch, "embeddings", StoreIdentity(
            model_fingerprint="cached", recipe="quality", dim=emb.shape[1], dtype="float32"))
        store.insert_missing(pool_ids, emb)
        yield store


@dataclasses.dataclass
class Live:
    """The default model and the real pool tokenized as the cached features were, for studies that compute
    gradients live (``live_setup``)."""

    features: Path
    meta: dict
    arrays: dict
    pool_ids: list[str]
    source_of: dict[str, str]
    settings: object
    loaded: object
    max_length: int
    pool: object

    def dev(self, data: Path, target: str):
        from idistill_core.data.chat import tokenize_rows
        from idistill_core.data.rows import load_rows

        rows = load_rows(str(data / "targets" / target / "dev.jsonl"), fmt="chat")
        return tokenize_rows(rows, self.loaded.tokenizer, self.max_length).examples


def live_setup(work: Path, data: Path) -> Live:
    """The newest cached features, the default profile's model (one torch thread) and the tokenized pool."""
    import torch

    from idistill_core.data.chat import tokenize_rows
    from idistill_core.data.rows import load_rows
    from idistill_core.models.loading import load_model
    from idistill_core.project.settings import load_settings

    torch.set_num_threads(1)
    features = max(work.glob("features-*"), key=lambda p: p.stat().st_mtime)
    meta, arrays = load_features(features)
    pool_ids = list(meta["pool_ids"])
    settings = load_settings("profiles/default.yaml")
    loaded = load_model(settings.model, attn_implementation="eager", cache_dir=settings.cache_dir)
    max_length = meta["recipe"]["max_length"]
    pool = tokenize_rows(load_rows(str(data / "pool.jsonl"), fmt="chat"), loaded.tokenizer, max_length).examples
    return Live(features, meta, arrays, pool_ids, dict(zip(pool_ids, meta["sources"], strict=True)), settings,
                loaded, max_length, pool)


def study_main(argv: list[str] | None, doc: str, run, out_name: str, targets: str, seeds: str) -> int:
    """The command line of a real-data study (``benchmarks/studies/*_quality.py``): ``run(work, data, targets,
    seeds, landmarks, budget) -> dict`` recorded with the machine and times in ``RESULTS_DIR / out_name``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(".idistill/quality"))
    parser.add_argument("--data", type=Path, default=Path(".idistill/realdata"))
    parser.add_argument("--targets", default=targets)
    parser.add_argument("--seeds", default=seeds)
    parser.add_argument("--landmarks", type=int, default=64)
    parser.add_argument("--budget", type=int, default=60)
    args = parser.parse_args(argv)
    started = utc_now()
    record = run(args.work, args.data, args.targets.split(","), [int(s) for s in args.seeds.split(",")],
                 args.landmarks, args.budget)
    record.update(machine=machine_info(), started_utc=started, finished_utc=utc_now())
    write_json_atomic(RESULTS_DIR / out_name, record)
    return 0


def share(selected, source_of, task) -> float:
    return float(np.mean([source_of[s] == task for s in selected]))


def evaluate(features: Path, landmarks: list[int], seeds: list[int], budget: int) -> dict:
    import datasets
    import torch

    from idistill_core.methods.base import SelectionContext
    from idistill_core.methods.random import random_scores
    from idistill_core.methods.rds import rds_scores_from_features
    from idistill_core.pipeline.recipe import SelectionRecipe
    from idistill_core.pipeline.selection import select_samples

    torch.set_num_threads(1)
    meta, arrays = load_features(features)
    pool_ids = list(meta["pool_ids"])
    source_of = dict(zip(pool_ids, meta["sources"], strict=True))
    row = {s: i for i, s in enumerate(pool_ids)}
    grads = arrays["pool_grads"]
    per_gradient_s = meta["timings"]["pool_gradients"] / len(pool_ids)
    pool_ds = datasets.Dataset.from_dict({"sample_id": pool_ids})

    def gradients(ids: list[str]) -> torch.Tensor:
        return torch.from_numpy(grads[[row[s] for s in ids]])

    results = {"targets": {}, "budget": budget, "landmarks": landmarks, "seeds": seeds}
    with cached_stores(pool_ids, arrays) as stores:
        for target in sorted(meta["targets"]):
            t_grads = arrays[f"target_grads/{target}"]
            t_ds = datasets.Dataset.from_dict({"sample_id": meta["targets"][target]["ids"]})
            out: dict = {"exact": {}, "id": {}}
            exact = {}
            for center in (False, True):
                for aggregate in ("mean", "rr"):
                    name = f"{'centred' if center else 'plain'}-{aggregate}"
                    sel = exact_selection(pool_ids, meta["sources"], grads, t_grads, budget, center, aggregate)
                    exact[name] = sel.selected
                    out["exact"][name] = share(sel.selected, source_of, target)
            cosine = rds_scores_from_features(arrays["pool_rds"], arrays[f"target_rds/{target}"])
            rds = select_samples(pool_ids, cosine, budget, "rr", seed=0, method="rds", fixed_order=True)
            out["rds"] = share(rds.selected, source_of, target)
            rand = select_samples(pool_ids, random_scores(pool_ids, 0), budget, method="random")
            out["random"] = share(rand.selected, source_of, target)
            for name, changes in RECIPES.items():
                reference = exact["centred-mean" if changes.get("center", True) else "plain-mean"]
                for num in landmarks:
                    runs = []
                    for seed in seeds:
                        recipe = recipe_for(changes, num_landmarks=num, seed=seed)
                        ctx = SelectionContext(None, None, "cached", pool_ds, t_ds, budget, recipe)
                        start = time.perf_counter()
                        report = propagate_cached(ctx, stores, arrays, target, gradients)
                        picked = report.outcome.selected
                        runs.append({
                            "seed": seed, "share": share(picked, source_of, target),
                            "overlap_with_exact": len(set(picked) & set(reference)) / budget,
                            "rho": report.fidelity, "seconds": time.perf_counter() - start,
                            "gradients": num + recipe.num_holdout + report.sizes.get("refinement", 0),
                        })
                    shares = [r["share"] for r in runs]
                    out["id"][f"{name}/L{num}"] = {
                        "share_mean": float(np.mean(shares)), "share_min": float(np.min(shares)),
                        "share_max": float(np.max(shares)),
                        "overlap_mean": float(np.mean([r["overlap_with_exact"] for r in runs])),
                        "rho_mean": float(np.nanmean([np.nan if r["rho"] is None else r["rho"] for r in runs])),
                        "runs": runs,
                    }
            refine = SelectionRecipe().refine_landmarks
            out["new_target_cost"] = {
                "gradients": refine + len(t_ds), "seconds_est": (refine + len(t_ds)) * per_gradient_s,
                "note": "the target's dev gradients plus its refinement landmarks; the shared landmarks, "
                        "embeddings and coefficients are reused",
            }
            results["targets"][target] = out
            print(json.dumps({"target": target, "exact": out["exact"], "rds": out["rds"],
                              **{k: round(v["share_mean"], 3) for k, v in out["id"].items()}}), flush=True)
    results["per_gradient_seconds"] = per_gradient_s
    # the pool passes every target shares: the JVP embedding, and the final-hidden part the default appends (one
    # decoder forward per sample: the same pass as RDS+'s features)
    results["pool_pass_seconds"] = {
        "jvp": meta["timings"].get("embeddings"), "final_hidden": meta["timings"].get("rds_features")}
    return results


def summary_rows(results: dict) -> list[dict]:
    rows = []
    for target, out in results["targets"].items():
        best_exact = max(out["exact"].values())
        row = {"target": target, "random": out["random"], "rds": out["rds"],
               "exact plain": out["exact"]["plain-mean"], "exact centred": out["exact"]["centred-mean"]}
        for key, value in out["id"].items():
            row[key] = f"{value['share_mean']:.2f} [{value['share_min']:.2f}, {value['share_max']:.2f}]"
        default = out["id"].get("default/L64")
        if default:
            row["L64 >= rds"] = default["share_mean"] >= out["rds"]
            row["L64 >= 0.9 best exact"] = default["share_mean"] >= 0.9 * best_exact
            row["worst within 0.1"] = default["share_mean"] - default["share_min"] <= 0.1
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(".idistill/quality"))
    parser.add_argument("--features", type=Path, default=None, help="a features-* folder (default: the newest)")
    parser.add_argument("--landmarks", default="32,64,128")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "quality.json")
    args = parser.parse_args(argv)
    features = args.features or max(args.work.glob("features-*"), key=lambda p: p.stat().st_mtime)
    results = evaluate(features, [int(x) for x in args.landmarks.split(",")], list(range(args.seeds)), args.budget)
    meta, _ = load_features(features)
    results.update(machine=machine_info(), finished_utc=utc_now(), features=features.name,
                   feature_recipe=meta["recipe"], feature_timings=meta["timings"])
    print_table(f"on-target share of {args.budget} picks (ID: mean [min, max] over {args.seeds} landmark draws)",
                summary_rows(results))
    write_json_atomic(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
