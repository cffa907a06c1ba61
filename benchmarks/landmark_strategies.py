"""Benchmark: landmark choice strategies (and gradient centering) against exact influence, over seeds.

One exact pass pays for the whole table: exact gradients of EVERY pool sample and JVP embeddings are computed
once and cached in the work dir (chunk by chunk, so a killed run keeps its work); every strategy, landmark
count L and seed then only picks rows of those. Measured per target: Spearman ρ vs exact on a fixed held-out
set (never landmarks), top-k overlap of the ID selection with the exact selection at the budget (k = 10% of
the pool), and the on-target share of the ID selection (pool source equal to the target's own source; GSM8K's
is ``arith``). Mean and standard deviation over seeds.

Run: ``nice python -m benchmarks.landmark_strategies --work-dir /tmp/h15-landmarks`` (or through
``benchmarks.run --only landmark_strategies``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

NAME = "landmark_strategies"
ON_TARGET_SOURCE = {"arith": "arith", "reading": "reading", "mcq": "mcq", "gsm8k": "arith"}
DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m-instruct",
    "pool_size": 512,
    "num_holdout": 64,
    "targets": ["arith", "reading", "mcq", "gsm8k"],
    "target_examples": 8,
    "max_length": 192,
    # the main job's recipe (profiles/default.yaml): float32 is what `auto` picks without native bfloat16
    "embed": {"num_blocks": 4, "num_tangents": 2, "proj_dim": 1024, "batch_size": 8, "dtype": "float32", "hidden": "none"},
    "landmarks": [32, 64, 128, 256],
    "gradients": {"param_subset": "down_proj", "proj_type": "srht", "proj_dim": 8192},
    "seeds": [0, 1, 2, 3, 4],
    "strategies": ["random", "kmeanspp", "kcenter", "leverage", "adaptive"],
    "budget_fraction": 0.1,
    # PropagateConfig fields of the KRR (as in a profile's recipe.propagate): {} = today's fixed rbf / median σ /
    # ridge 1e-2; {"kernel": "auto", "ridge": "auto", "bandwidth_scale": "auto"} = chosen by CV over the
    # landmarks' own gradients, as the pipeline does (idistill_core.steps.kernel_select)
    "propagate": {},
}


# ---------------------------------------------------------------------------------------------------------
# phase 1: the one exact pass (cached)
# ---------------------------------------------------------------------------------------------------------
def build_cache(params: dict[str, Any], work_dir: Path, chunk: int = 8) -> Path:
    """Exact gradients of all pool samples + targets and pool embeddings, cached in ``work_dir/cache.pt``."""
    from benchmarks.common import builtin_data, load_bench_model, tokenized
    from idistill_core.data.batch import batches_for
    from idistill_core.steps.embed import EmbedConfig, embed_samples
    from idistill_core.steps.gradients import GradientConfig, iter_gradients

    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "cache.pt"
    cache: dict[str, Any] = torch.load(path) if path.exists() else {"grads": {}, "emb": {}, "targets": {}}
    model, tokenizer, fingerprint = load_bench_model(params["model"], "cpu", 0)
    data = builtin_data(work_dir, params["pool_size"], 0, gsm8k="gsm8k" in params["targets"])
    pool = tokenized(data / "pool.jsonl", tokenizer, params["max_length"])
    cache["sources"] = {s: s.rsplit("-", 1)[0] for s in pool["sample_id"]}  # ids are <source>-000123
    cache["fingerprint"] = fingerprint
    gconfig = GradientConfig(**params["gradients"])
    econfig = EmbedConfig(**params["embed"])

    def save() -> None:
        torch.save(cache, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)

    for name in params["targets"]:
        if name in cache["targets"]:
            continue
        examples = tokenized(
            data / "targets" / name / "dev.jsonl",
            tokenizer,
            params["max_length"],
            limit=params["target_examples"],
        )
        rows = [
            g for _, g in iter_gradients(model, batches_for(examples, tokenizer, gconfig.batch_size), gconfig)
        ]
        cache["targets"][name] = torch.cat(rows)
        save()
        print(f"{NAME}: target {name} gradients done", flush=True)
    ids = sorted(pool["sample_id"])
    # a seeded order, chunk by chunk (embedding and gradient of the same samples), so a partial cache is a
    # uniform random subset of the pool with everything the table needs
    order = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]
    missing = [s for s in order if s not in cache["grads"] or s not in cache["emb"]]
    for first in range(0, len(missing), chunk):
        part = missing[first : first + chunk]
        began = time.perf_counter()
        for batch_ids, vectors in embed_samples(model, batches_for(pool, tokenizer, econfig.batch_size, ids=part), econfig):
            for i, s in enumerate(batch_ids):
                cache["emb"][s] = torch.from_numpy(np.asarray(vectors[i], dtype=np.float32))
        mid = time.perf_counter()
        for batch_ids, grads in iter_gradients(model, batches_for(pool, tokenizer, gconfig.batch_size, ids=part), gconfig):
            for i, s in enumerate(batch_ids):
                cache["grads"][s] = grads[i].clone()
        cache["embed_s"] = cache.get("embed_s", 0.0) + mid - began
        cache["grad_s"] = cache.get("grad_s", 0.0) + time.perf_counter() - mid
        save()
        print(f"{NAME}: {len(cache['grads'])}/{len(ids)} samples (embedding {(mid - began) / len(part):.2f} s, "
              f"exact gradient {(time.perf_counter() - mid) / len(part):.2f} s per sample)", flush=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# phase 2: the table (rows of the cache only)
# ---------------------------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _scores(pool_grads: np.ndarray, target_grads: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """First-order influence with the mean target gradient (the pipeline's 'mean'); with ``mean``, pool and
    target gradients are first centred on it and re-normalised (the shared component removed)."""
    if mean is not None:
        pool_grads, target_grads = _unit(pool_grads - mean), _unit(target_grads - mean)
    return pool_grads @ target_grads.mean(axis=0)


def _evaluate(ids, sources, emb, grads, targets, params, strategy, count, seed, centred, holdout, budget):
    from idistill_core.pipeline.propagation import keep_exact, spearman
    from idistill_core.steps import landmarks
    from idistill_core.steps.propagate import KernelRidge, PropagateConfig

    position = {s: i for i, s in enumerate(ids)}
    cand = [s for s in ids if s not in set(holdout)]
    cand_rows = np.array([position[s] for s in cand])
    config = landmarks.LandmarkConfig(strategy=strategy)
    first, _ = landmarks.choose(
        cand, count, 0, seed, config, emb[cand_rows] if config.needs_embeddings else None
    )
    pool_mean = grads.mean(axis=0) if centred else None
    out = {}
    ho_rows = np.array([position[s] for s in holdout])
    for name, tg in targets.items():
        exact = _scores(grads, tg, pool_mean)
        lm = list(first)

        def estimate(lm_ids, tg=tg):
            rows = np.array([position[s] for s in lm_ids])
            mean = grads[rows].mean(axis=0) if centred else None  # ID only knows its landmarks' gradients
            values = _scores(grads[rows], tg, mean)[:, None]
            config = PropagateConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in params.get("propagate", {}).items()}
            )
            if config.needs_selection:  # the pipeline's choice: CV on the gradients the values come from
                from idistill_core.steps.kernel_select import select_kernel

                lm_grads = grads[rows] if mean is None else _unit(grads[rows] - mean)
                config = select_kernel(emb[rows], lm_grads, config).config
            ridge = KernelRidge.fit(emb[rows], config)
            return values, np.asarray(ridge.predict(values, [emb]))[:, 0]

        values, predicted = estimate(lm)
        if strategy == "adaptive" and len(lm) < count:
            lm = lm + landmarks.boundary_picks(ids, predicted, budget, count - len(lm), lm + list(holdout))
            values, predicted = estimate(lm)
        final = keep_exact(ids, predicted[:, None], lm, [values])[:, 0]
        top_exact = set(np.argsort(-exact, kind="stable")[:budget].tolist())
        top_id = np.argsort(-final, kind="stable")[:budget]
        out[name] = {
            "rho": spearman(predicted[ho_rows], exact[ho_rows]),
            "overlap": len(top_exact & set(top_id.tolist())) / budget,
            "on_target": float(np.mean([sources[ids[i]] == ON_TARGET_SOURCE[name] for i in top_id])),
            "exact_on_target": float(np.mean([sources[ids[i]] == ON_TARGET_SOURCE[name] for i in top_exact])),
        }
    return out


def table(params: dict[str, Any], work_dir: Path, results_dir: Path, profile: str, machine: dict) -> dict:
    from benchmarks.common import print_table, write_result

    began = time.perf_counter()
    cache = torch.load(Path(work_dir) / "cache.pt")
    ids = sorted(s for s in cache["grads"] if s in cache["emb"])
    n = len(ids)
    grads = torch.stack([cache["grads"][s] for s in ids]).double().numpy()
    emb = torch.stack([cache["emb"][s] for s in ids]).double().numpy()
    targets = {t: cache["targets"][t].double().numpy() for t in params["targets"] if t in cache["targets"]}
    num_holdout = min(params["num_holdout"], n // 5)
    holdout = [ids[i] for i in np.random.default_rng(12345).permutation(n)[:num_holdout]]
    budget = max(1, round(params["budget_fraction"] * n))
    counts = [c for c in params["landmarks"] if c <= n - num_holdout]
    rows, flat = [], []
    for centred in (False, True):
        for strategy in params["strategies"]:
            for count in counts:
                per_seed = [
                    _evaluate(
                        ids,
                        cache["sources"],
                        emb,
                        grads,
                        targets,
                        params,
                        strategy,
                        count,
                        seed,
                        centred,
                        holdout,
                        budget,
                    )
                    for seed in params["seeds"]
                ]
                for name in targets:
                    got = {m: [r[name][m] for r in per_seed] for m in ("rho", "overlap", "on_target")}
                    row = {
                        "centred": centred,
                        "strategy": strategy,
                        "L": count,
                        "target": name,
                        "exact_on_target": per_seed[0][name]["exact_on_target"],
                    }
                    for metric, values in got.items():
                        row[f"{metric}_mean"] = float(np.mean(values))
                        row[f"{metric}_std"] = float(np.std(values))
                        row[f"{metric}_per_seed"] = values
                    rows.append(row)
                mean = {
                    m: float(np.mean([r[f"{m}_mean"] for r in rows[-len(targets) :]]))
                    for m in ("rho", "overlap", "on_target")
                }
                flat.append({"centred": centred, "strategy": strategy, "L": count, **mean})
                print(f"{NAME}: centred={centred} {strategy} L={count} {mean}", flush=True)
    text = print_table(
        f"landmark strategies (N={n}, k={budget}, {len(params['seeds'])} seeds; mean over targets)",
        [
            {
                "centred": r["centred"],
                "strategy": r["strategy"],
                "L": r["L"],
                "rho": r["rho"],
                "top-k overlap": r["overlap"],
                "on-target": r["on_target"],
            }
            for r in flat
        ],
    )
    figures = {
        "pool_n": n,
        "budget": budget,
        "num_holdout": num_holdout,
        "summary": flat,
        "exact_on_target": {
            t: next(r["exact_on_target"] for r in rows if r["target"] == t and not r["centred"])
            for t in targets
        },
        "exact_gradient_s_per_sample": cache.get("grad_s", 0.0) / max(1, len(cache["grads"])),
        "embed_s_per_sample": cache.get("embed_s", 0.0) / max(1, len(cache["emb"])),
    }
    notes = [
        (f"one exact pass: gradients of all {n} pool samples (param_subset {params['gradients']['param_subset']!r},"
        f" SRHT {params['gradients']['proj_dim']}); every strategy/L/seed picks rows of it"),
        (f"rho on {num_holdout} fixed held-out samples (never landmarks); top-k overlap and on-target share of the "
        f"ID top-{budget} (landmarks keep their exact scores) vs the exact top-{budget}"),
        ("centred: pool and target gradients centred on the mean gradient (exact: pool mean; ID: landmark mean) "
        "and re-normalised, and compared with the centred exact scores"),
    ]
    write_result(
        results_dir, NAME, profile, params, figures, rows, notes, machine, time.perf_counter() - began
    )
    (Path(results_dir) / f"{NAME}.md").write_text(text)
    return figures


def run(params: dict[str, Any], results_dir: Path, work_dir: Path, profile: str, machine: dict) -> dict:
    """``benchmarks.run --only landmark_strategies``: the cache (in the work dir), then the table."""
    params = {**DEFAULTS, **params}
    build_cache(params, Path(work_dir) / NAME)
    return table(params, Path(work_dir) / NAME, results_dir, profile, machine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--phase", choices=["cache", "table", "all"], default="all")
    parser.add_argument("--pool-size", type=int, default=DEFAULTS["pool_size"])
    args = parser.parse_args(argv)
    params = {**DEFAULTS, "pool_size": args.pool_size}
    if args.phase in ("cache", "all"):
        build_cache(params, args.work_dir)
    if args.phase in ("table", "all"):
        from benchmarks.common import RESULTS_DIR, machine_info

        table(params, args.work_dir, RESULTS_DIR, "full", machine_info())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
