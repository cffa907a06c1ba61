"""The expensive, target-independent part of the selection-quality benchmark, computed once and cached.

For the real pool of ``benchmarks.quality.realdata``: every pool sample's exact gradient (the recipe's gradient
config: parameter subset, unit norm, sketch), its JVP embedding and RDS+ feature, and every target's dev
gradients and RDS+ features, all with the library's own pipeline functions (``compute_gradients_resumable``,
``embed_pool``, ``embed_rds_pool``). Exact influence, ID at any L and seed, and RDS+ are then cheap arithmetic
on these arrays (``benchmarks.quality.run``): an ID landmark's gradient is exactly the pool gradient computed
here (the computation is deterministic per sample), so drawing landmarks from the cache is the same as
computing them fresh.

Run: ``python -m benchmarks.quality.features --data .idistill/realdata --work .idistill/quality``
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from idistill_core.store.hashing import config_fingerprint, ids_hash, stable_hash

logger = logging.getLogger("idistill")


def feature_key(model_fingerprint: str, recipe, pool_ids: list[str]) -> str:
    return stable_hash(
        {"model": model_fingerprint, "gradients": config_fingerprint(recipe.gradients),
         "embed": config_fingerprint(recipe.embed), "max_length": recipe.max_length, "pool": ids_hash(pool_ids)},
        12,
    )


def compute_features(data: Path, work: Path, profile: Path, max_length: int, progress: bool = True) -> Path:
    """Compute (or reuse) every cached array; returns the folder holding them (``features.npz`` + ``meta.json``)."""
    import dataclasses

    import torch

    from idistill_core.data.batch import batches_for, in_order
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.data.rows import load_rows
    from idistill_core.methods.rds import rds_embeddings
    from idistill_core.models.loading import load_model
    from idistill_core.pipeline.embeddings import embed_pool, embed_rds_pool, open_rds_store, open_store
    from idistill_core.pipeline.gradients import compute_gradients, compute_gradients_resumable
    from idistill_core.pipeline.recipe import resolve_recipe
    from idistill_core.project.settings import load_settings

    settings = load_settings(profile)
    loaded = load_model(settings.model, attn_implementation="eager", cache_dir=settings.cache_dir)
    recipe = dataclasses.replace(settings.recipe, max_length=max_length)
    recipe, precision = resolve_recipe(recipe, loaded.model)
    # the JVP part alone: the final-hidden part is `pool_rds` (the same feature), composed per recipe by `run`
    recipe = dataclasses.replace(recipe, embed=dataclasses.replace(recipe.embed, hidden="none"))
    pool_rows = load_rows(str(data / "pool.jsonl"), fmt="chat")
    pool = tokenize_rows(pool_rows, loaded.tokenizer, recipe.max_length)
    pool_ids = list(pool.examples["sample_id"])
    source_of = dict(zip(pool_rows["sample_id"], pool_rows["source"], strict=True))
    key = feature_key(loaded.fingerprint, recipe, pool_ids)
    out = work / f"features-{key}"
    if (out / "meta.json").exists():
        logger.info("features: reusing %s", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    store = open_store(work / "lancedb", "embeddings", loaded.fingerprint, recipe, loaded.model.config.hidden_size)
    embed_pool(loaded.model, loaded.tokenizer, pool.examples, store, recipe.embed, progress=progress)
    emb = store.read(pool_ids)
    timings["embeddings"] = time.perf_counter() - start
    start = time.perf_counter()
    rds_store = open_rds_store(work / "lancedb", loaded.fingerprint, recipe.max_length, loaded.model.config.hidden_size)
    embed_rds_pool(loaded.model, loaded.tokenizer, pool.examples, rds_store, recipe.batch_size)
    rds = rds_store.read(pool_ids)
    timings["rds_features"] = time.perf_counter() - start
    start = time.perf_counter()
    grads = compute_gradients_resumable(
        loaded.model, loaded.tokenizer, pool.examples, pool_ids, recipe.gradients, work / f"shards-{key}",
        on_chunk=lambda done, total: logger.info("pool gradients: chunk %d/%d", done, total),
    ).grads.numpy()
    timings["pool_gradients"] = time.perf_counter() - start
    arrays = {"pool_emb": emb, "pool_grads": grads, "pool_rds": rds}
    targets = {}
    for folder in sorted((data / "targets").iterdir()):
        dev = tokenize_rows(load_rows(str(folder / "dev.jsonl"), fmt="chat"), loaded.tokenizer, recipe.max_length)
        ids = list(dev.examples["sample_id"])
        start = time.perf_counter()
        tg = compute_gradients(loaded.model, loaded.tokenizer, dev.examples, None, recipe.gradients).grads.numpy()
        got, feats = rds_embeddings(loaded.model, batches_for(dev.examples, loaded.tokenizer, recipe.batch_size, bucket=False))
        timings[f"target_{folder.name}"] = time.perf_counter() - start
        arrays[f"target_grads/{folder.name}"] = tg
        arrays[f"target_rds/{folder.name}"] = np.asarray(in_order(ids, got, feats.numpy()))
        targets[folder.name] = {"ids": ids, "dropped": dev.dropped_ids}
    # the JVP embeddings of the dev samples (for target-aware landmarks) go through the same embedder
    from idistill_core.steps.embed import embed_samples

    for folder in sorted((data / "targets").iterdir()):
        dev = tokenize_rows(load_rows(str(folder / "dev.jsonl"), fmt="chat"), loaded.tokenizer, recipe.max_length)
        ids = list(dev.examples["sample_id"])
        got, parts = [], []
        for batch_ids, vectors in embed_samples(loaded.model, batches_for(dev.examples, loaded.tokenizer, 8), recipe.embed):
            got += batch_ids
            parts.append(vectors)
        arrays[f"target_emb/{folder.name}"] = np.asarray(in_order(ids, got, np.concatenate(parts)))
    np.savez(out / "features.npz", **arrays)
    meta = {
        "pool_ids": pool_ids, "sources": [source_of[s] for s in pool_ids], "targets": targets,
        "dropped": pool.dropped_ids, "truncated": pool.num_truncated, "model": loaded.spec,
        "fingerprint": loaded.fingerprint, "recipe": {"gradients": dataclasses.asdict(recipe.gradients),
        "embed": dataclasses.asdict(recipe.embed), "max_length": recipe.max_length}, "precision": precision,
        "timings": timings, "torch_threads": torch.get_num_threads(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(".idistill/realdata"))
    parser.add_argument("--work", type=Path, default=Path(".idistill/quality"))
    parser.add_argument("--profile", type=Path, default=Path("profiles/default.yaml"))
    parser.add_argument("--max-length", type=int, default=512)  # what quality.json was measured with
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(compute_features(args.data, args.work, args.profile, args.max_length))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
