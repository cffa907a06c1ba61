"""The selection workload shared by benchmarks 2, 3 and 6: pool, targets, embeddings and exact gradients.

Exact gradients are cached per run in the work dir (keyed by model, gradient config and sequence length), each
row with the seconds it took, so the landmark sweep (3) reuses the landmarks and held-out samples the
end-to-end benchmark (2) already paid for and still reports a measured time for every landmark count.
The held-out samples (never landmarks) come first in one seeded permutation of the pool ids and the landmarks
of every L are a prefix of the rest, so a smaller L is always a subset of a larger one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import bench_recipe, builtin_data, load_bench_model, tokenized
from idistill_core.data.batch import batches_for
from idistill_core.pipeline.embeddings import open_store
from idistill_core.pipeline.propagation import spearman
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.steps.embed import embed_samples
from idistill_core.steps.gradients import iter_gradients
from idistill_core.store.hashing import config_fingerprint


@dataclass
class Workload:
    model: Any
    tokenizer: Any
    fingerprint: str
    pool: Any
    """Tokenized pool examples (``datasets.Dataset``)."""
    targets: dict[str, Any]
    """Target name -> tokenized dev examples."""
    recipe: SelectionRecipe
    work_dir: Path
    device: str
    pool_size: int

    @property
    def pool_ids(self) -> list[str]:
        return list(self.pool["sample_id"])


def load(
    model: str,
    device: str,
    work_dir: str,
    pool_size: int,
    targets: list[str],
    max_length: int,
    embed: dict,
    gradients: dict,
    propagate: dict,
    seed: int = 0,
    target_examples: int | None = None,
) -> Workload:
    net, tokenizer, fingerprint = load_bench_model(model, device, seed)
    data = builtin_data(work_dir, pool_size, seed)
    pool = tokenized(data / "pool.jsonl", tokenizer, max_length)
    targets_tok = {
        t: tokenized(data / "targets" / t / "dev.jsonl", tokenizer, max_length, limit=target_examples)
        for t in targets
    }
    recipe = bench_recipe(max_length, seed, embed, gradients, propagate)
    return Workload(net, tokenizer, fingerprint, pool, targets_tok, recipe, Path(work_dir), device, pool_size)


def shuffled_ids(work: Workload) -> list[str]:
    """One seeded permutation of the sorted pool ids: held-out samples first, then the landmark order."""
    ordered = sorted(work.pool_ids)
    perm = np.random.default_rng(work.recipe.seed).permutation(len(ordered))
    return [ordered[i] for i in perm]


def split(ids: list[str], num_holdout: int) -> tuple[list[str], list[str]]:
    """``(holdout ids, landmark order)`` of the (shuffled, embedded) pool ids."""
    return ids[:num_holdout], ids[num_holdout:]


# ---------------------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------------------
def _marker(work: Workload) -> Path:
    return work.work_dir / f"pool_table_{work.fingerprint[:8]}_{work.pool_size}.json"


def embed_fresh(work: Workload, time_budget_s: float | None = None, chunk: int = 64) -> tuple[Any, dict]:
    """Embed the pool, in the shuffled order, into a new LanceDB table (so the time is a real one).

    With ``time_budget_s`` embedding stops after the first chunk that ends past the budget, so on a slow
    (or busy) machine the measured pool is a prefix of the shuffled order; ``info["ids"]`` lists it. The
    table and ids are recorded in the work dir for the landmark sweep.
    """
    table = f"emb_{work.fingerprint[:8]}_{work.pool_size}_{os.getpid()}"
    hidden = work.model.config.hidden_size
    store = open_store(work.work_dir / "lancedb", table, work.fingerprint, work.recipe, hidden)
    order = shuffled_ids(work)
    batches = batches_for(work.pool, work.tokenizer, work.recipe.embed.batch_size, ids=order)
    done: list[str] = []
    pending_ids: list[str] = []
    pending: list[np.ndarray] = []
    start = time.perf_counter()
    # The generator is lazy: breaking out of the loop stops the embedding work itself.
    for ids, vectors in embed_samples(work.model, batches, work.recipe.embed):
        pending_ids += ids
        pending.append(vectors)
        if len(pending_ids) >= chunk:
            store.insert_missing(pending_ids, np.concatenate(pending))
            done += pending_ids
            pending_ids, pending = [], []
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                break
    if pending_ids:
        store.insert_missing(pending_ids, np.concatenate(pending))
        done += pending_ids
    seconds = time.perf_counter() - start
    info = {"table": table, "seconds": seconds, "rows": store.count(), "ids": done}
    _marker(work).write_text(json.dumps(info))
    return store, info


def record(work: Workload, **values: Any) -> None:
    """Add ``values`` (e.g. the held-out count end_to_end settled on) to the pool record of this run."""
    marker = _marker(work)
    info = json.loads(marker.read_text()) if marker.exists() else {}
    marker.write_text(json.dumps({**info, **values}))


def embedded_store(work: Workload, time_budget_s: float | None = None) -> tuple[Any, dict]:
    """The table an earlier benchmark of this run filled, else a fresh one (``info["reused"]`` says which)."""
    marker = _marker(work)
    if marker.exists():
        info = json.loads(marker.read_text())
        hidden = work.model.config.hidden_size
        store = open_store(work.work_dir / "lancedb", info["table"], work.fingerprint, work.recipe, hidden)
        if store.count() == len(info["ids"]):
            return store, {**info, "reused": True}
    store, info = embed_fresh(work, time_budget_s)
    return store, {**info, "reused": False}


# ---------------------------------------------------------------------------------------------------------
# exact gradients with a per-run cache
# ---------------------------------------------------------------------------------------------------------
def _cache_path(work: Workload) -> Path:
    key = config_fingerprint(work.recipe.gradients)
    return work.work_dir / f"grads_{work.fingerprint[:8]}_{key}_len{work.recipe.max_length}.pt"


def exact_gradients(
    work: Workload, examples, ids: list[str], read_cache: bool = True, dry_run: bool = False
) -> tuple[torch.Tensor | None, np.ndarray | None, int]:
    """Projected unit-norm gradients of ``ids`` (rows in that order), as the pipeline computes them.

    Returns:
        ``(grads (n, P) float32, seconds (n,) each row took when it was computed, rows computed now)``;
        with ``dry_run`` only the number of rows that would be computed (nothing is computed).
    """
    path = _cache_path(work)
    cache: dict[str, Any] = torch.load(path) if path.exists() else {"rows": {}, "seconds": {}}
    missing = [s for s in ids if not (read_cache and s in cache["rows"])]
    if dry_run:
        return None, None, len(missing)
    if missing:
        batches = batches_for(examples, work.tokenizer, work.recipe.gradients.batch_size, ids=missing)
        start = time.perf_counter()
        for batch_ids, grads in iter_gradients(work.model, batches, work.recipe.gradients):
            now = time.perf_counter()
            for row, sample_id in enumerate(batch_ids):
                cache["rows"][sample_id] = grads[row].clone()
                cache["seconds"][sample_id] = (now - start) / len(batch_ids)
            start = now
        torch.save(cache, path)
    grads = torch.stack([cache["rows"][s] for s in ids])
    seconds = np.array([cache["seconds"][s] for s in ids])
    return grads, seconds, len(missing)


def target_gradients(work: Workload, read_cache: bool = True) -> tuple[dict[str, torch.Tensor], float]:
    """``({target: (T, P)}, seconds)`` for every target's dev examples."""
    out, seconds = {}, 0.0
    for name, examples in work.targets.items():
        grads, secs, _ = exact_gradients(work, examples, list(examples["sample_id"]), read_cache)
        out[name] = grads
        seconds += float(secs.sum())
    return out, seconds


def influence(grads: torch.Tensor, targets: dict[str, torch.Tensor]) -> np.ndarray:
    """``(n, T_targets)`` first-order influence G ḡ_t, one column per target (the pipeline's 'mean')."""
    from idistill_core.steps.influence import landmark_values

    return np.concatenate([landmark_values(grads, tg, "mean") for tg in targets.values()], axis=1)


def rank_agreement(
    predicted: np.ndarray, exact: np.ndarray, top_fraction: float = 0.1
) -> dict[str, list[float]]:
    """Per target column: Spearman ρ, and the share of the exact top ``top_fraction`` that ID also ranks there."""
    rho, overlap = [], []
    k = max(1, round(top_fraction * len(exact)))
    for t in range(exact.shape[1]):
        rho.append(spearman(predicted[:, t], exact[:, t]))
        top_pred = set(np.argsort(-predicted[:, t], kind="stable")[:k].tolist())
        top_exact = set(np.argsort(-exact[:, t], kind="stable")[:k].tolist())
        overlap.append(len(top_pred & top_exact) / k)
    return {"spearman": rho, "top_overlap": overlap}
