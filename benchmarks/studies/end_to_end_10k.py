"""The real default model end to end at N = 10,000 and L = 512, resumable across processes (issue 11 item 5).

The main job's recipe (``profiles/default.yaml``: JVP embeddings of 4 blocks, 2 tangents, D = 1024, dtype
auto; down_proj gradients SRHT-projected to 8192; the default propagation; 192 tokens) on the built-in pool at
N, with the targets' dev examples. Every stage goes through the pipeline's own functions:

1. ``target_gradients``: one chunk per target (``compute_gradients_resumable``);
2. ``embeddings``: ``embed_pool`` into a LanceDB store in the work dir, chunk by chunk in one global length
   order (the main job buckets the whole pool by length; chunking that order keeps its batches);
3. ``landmark_gradients``: L landmarks of the random strategy with the recipe's seed (``choose_landmarks``),
   through ``compute_gradients_resumable`` into one shard folder, a chunk at a time;
4. ``holdout_gradients``: H samples that are never landmarks, the same way (the measured sample of exact
   selection, and the samples ρ is measured on);
5. ``propagation_selection``: KRR propagation of the landmark values to the pool, top-k per target.

Why resumable: on 2 shared cores the run takes over an hour. Kill it at any time and start it again with the
same command: done chunks are never recomputed (their embeddings and shards are on disk) and their measured
times, process CPU seconds and load averages are kept in ``<work-dir>/progress.json`` (written atomically after
each chunk), so a stage's time is the sum over its chunks however many processes it took. Work of a chunk that
was killed halfway is lost and not counted. The figures are written only when every stage is complete.

Figures (``benchmarks/results/end_to_end_10k.json``, and the four headline ones merged into ``scale.json``):
``end_to_end_10k_seconds`` = target gradients + embeddings + landmark gradients + propagation and selection
(the held-out gradients are measurement only, not part of ID); ``exact_10k_seconds`` = N × the median measured
exact-gradient seconds per sample (over the landmark and held-out chunks) + target gradients + selection;
``spearman_vs_exact_10k`` = mean over targets of Spearman ρ(propagated, exact first-order score) on the H
held-out samples.

Run: ``nice -n 10 python -m benchmarks.studies.end_to_end_10k --work-dir /work/e2e10k`` (``--status`` shows progress).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import utc_now, write_json_atomic

NAME = "end_to_end_10k"
STAGES = ["target_gradients", "embeddings", "landmark_gradients", "holdout_gradients", "propagation_selection"]
ID_STAGES = ["target_gradients", "embeddings", "landmark_gradients", "propagation_selection"]
PUBLISHED = {"model": "smollm2-135m-instruct", "pool_size": 10_000, "landmarks": 512}
DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m-instruct",
    "pool_size": 10_000,
    "landmarks": 512,
    "holdout": 128,
    "targets": ["arith", "reading", "mcq", "gsm8k"],
    "target_examples": 8,
    "max_length": 192,
    "budget_fraction": 0.1,
    "embed_chunk": 256,
    "gradient_chunk": 32,
    "profile": "profiles/default.yaml",
    "embed_overrides": {},
    "gradient_overrides": {},
}
# Tiny random model and pool: the same code in seconds (tests/core/test_end_to_end_10k.py).
SMOKE: dict[str, Any] = {
    **DEFAULTS,
    "model": "tiny-llama",
    "pool_size": 48,
    "landmarks": 12,
    "holdout": 10,
    "targets": ["arith", "reading", "mcq"],
    "target_examples": 4,
    "embed_chunk": 16,
    "gradient_chunk": 4,
    "embed_overrides": {"proj_dim": 32, "dtype": "float32"},
    "gradient_overrides": {"proj_dim": 256},
}


class Stopped(Exception):
    """The chunk limit of this process (``--max-chunks``) was reached; a re-run continues."""


# ---------------------------------------------------------------------------------------------------------
# progress file
# ---------------------------------------------------------------------------------------------------------
def _key(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


class Progress:
    """``<work-dir>/progress.json``: the parameters, and per stage its chunks with their measured seconds."""

    def __init__(self, work_dir: Path, params: dict[str, Any]):
        self.path = work_dir / "progress.json"
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            if self.data["params_key"] != _key(params):
                raise SystemExit(
                    f"{self.path}: made with other parameters ({self.data['params']}); use another --work-dir "
                    f"or the same parameters (now {params})"
                )
        else:
            self.data = {"params": params, "params_key": _key(params), "stages": {}, "sessions": []}

    def stage(self, name: str, total: int) -> dict[str, Any]:
        entry = self.data["stages"].setdefault(name, {"total": total, "chunks": [], "complete": False})
        entry["total"] = total
        return entry

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


class Runner:
    """Times one chunk at a time and enforces ``--max-chunks`` (chunks computed by this process)."""

    def __init__(self, progress: Progress, max_chunks: int | None):
        self.progress = progress
        self.max_chunks = max_chunks
        self.computed = 0

    def chunk(self, stage: str, index: int, samples: int, work) -> Any:
        if self.max_chunks is not None and self.computed >= self.max_chunks:
            self.progress.save()
            raise Stopped(f"stopped after {self.computed} chunks (--max-chunks); run again to continue")
        wall, cpu = time.perf_counter(), time.process_time()
        out = work()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        entry = self.progress.data["stages"][stage]
        entry["chunks"].append(
            {
                "index": index,
                "samples": samples,
                "wall_s": round(wall, 4),
                "cpu_s": round(cpu, 4),
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "utc": utc_now(),
                "session": len(self.progress.data["sessions"]) - 1,
            }
        )
        self.progress.save()
        self.computed += 1
        done = sum(c["samples"] for c in entry["chunks"])
        secs = sum(c["wall_s"] for c in entry["chunks"])
        rate = secs / max(done, 1)
        eta = rate * (entry["total"] - done)
        print(
            f"[{NAME}] {stage}: {done}/{entry['total']} samples, chunk {samples / max(wall, 1e-9):.2f}/s "
            f"({wall / max(samples, 1):.3f} s/sample; stage mean {rate:.3f} s/sample), ETA {eta / 60:.1f} min, "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        return out

    def untimed(self, stage: str, index: int, samples: int) -> None:
        """A chunk whose results were committed by a process killed before it recorded the time (a window of
        milliseconds): kept, and counted at the stage's mean measured rate (``finish``)."""
        self.progress.data["stages"][stage]["chunks"].append(
            {"index": index, "samples": samples, "wall_s": 0.0, "cpu_s": 0.0, "untimed": True,
             "load_average": [round(x, 2) for x in os.getloadavg()],
             "session": len(self.progress.data["sessions"]) - 1}
        )
        self.progress.save()

    def done_indices(self, stage: str) -> set[int]:
        return {c["index"] for c in self.progress.data["stages"][stage]["chunks"]}


# ---------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------
def _recipe(params: dict[str, Any], model):
    from idistill_core.pipeline.recipe import resolve_recipe
    from idistill_core.project.settings import load_settings

    base = load_settings(params["profile"]).recipe
    recipe = dataclasses.replace(
        base,
        num_landmarks=params["landmarks"],
        num_holdout=params["holdout"],
        max_length=params["max_length"],
        embed=dataclasses.replace(base.embed, **params["embed_overrides"]),
        gradients=dataclasses.replace(base.gradients, **params["gradient_overrides"]),
    )
    return resolve_recipe(recipe, model)


def _gradients_in_chunks(runner, stage, model, tokenizer, examples, ids, config, shard_dir, chunk):
    """Gradients of ``ids`` through ``compute_gradients_resumable``, one chunk of shards per timed step.

    Each step asks for the prefix up to the next chunk: the shards already written are loaded, only the new
    chunk is computed (the chunking of a prefix equals the first chunks of the whole list).
    """
    from idistill_core.pipeline.gradients import compute_gradients_resumable

    runner.progress.stage(stage, len(ids))
    step = max(config.batch_size, chunk - chunk % config.batch_size)
    starts = list(range(0, len(ids), step))
    done = runner.done_indices(stage)
    for index, start in enumerate(starts):
        shard = Path(shard_dir) / f"chunk-{index:05d}.safetensors"
        if index in done and shard.exists():
            continue
        # a shard without a recorded time (killed between the two writes) is recomputed, so every chunk is timed
        shard.unlink(missing_ok=True)
        prefix = ids[: start + step]
        runner.chunk(
            stage,
            index,
            len(prefix) - start,
            lambda prefix=prefix: compute_gradients_resumable(
                model, tokenizer, examples, prefix, config, shard_dir, chunk_size=step
            ),
        )
    out = compute_gradients_resumable(model, tokenizer, examples, ids, config, shard_dir, chunk_size=step)
    runner.progress.data["stages"][stage]["complete"] = True
    runner.progress.save()
    return out


def run(params: dict[str, Any], work_dir: Path, results_dir: Path | None, max_chunks: int | None) -> dict | None:
    """Run (or continue) every stage; returns the figures once complete (None when stopped early)."""
    from benchmarks.common import builtin_data, git_commit, load_bench_model, machine_info, tokenized
    from idistill_core.data.batch import length_order
    from idistill_core.pipeline.embeddings import embed_pool, open_store
    from idistill_core.pipeline.landmarks import choose_landmarks
    from idistill_core.steps.influence import landmark_values
    from idistill_core.store.hashing import config_fingerprint

    work_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(work_dir, params)
    runner = Runner(progress, max_chunks)
    began = time.perf_counter()
    model, tokenizer, fingerprint = load_bench_model(params["model"], "cpu", 0)
    recipe, precision = _recipe(params, model)
    data = builtin_data(work_dir, params["pool_size"], recipe.seed, gsm8k="gsm8k" in params["targets"])
    pool = tokenized(data / "pool.jsonl", tokenizer, recipe.max_length)
    targets = {
        t: tokenized(data / "targets" / t / "dev.jsonl", tokenizer, recipe.max_length, limit=params["target_examples"])
        for t in params["targets"]
    }
    session = {"pid": os.getpid(), "started_utc": utc_now(),
               "setup_s": round(time.perf_counter() - began, 2), "precision": precision,
               "git_commit": git_commit()}  # the code this session runs (HEAD may move before the run ends)
    progress.data["sessions"].append(session)
    progress.data["machine"] = {"cpu": machine_info()["cpu"], "cpu_count": os.cpu_count()}
    progress.save()
    grad_dir = work_dir / "gradients" / f"{fingerprint[:8]}-{config_fingerprint(recipe.gradients)}-len{recipe.max_length}"
    try:
        # 1. target gradients, one chunk per target
        entry = progress.stage("target_gradients", sum(len(e) for e in targets.values()))
        done = runner.done_indices("target_gradients")
        target_grads = {}
        for index, (name, examples) in enumerate(targets.items()):
            ids = list(examples["sample_id"])
            shard_dir = grad_dir / "targets" / name
            from idistill_core.pipeline.gradients import compute_gradients_resumable

            def work(examples=examples, ids=ids, shard_dir=shard_dir):
                return compute_gradients_resumable(
                    model, tokenizer, examples, ids, recipe.gradients, shard_dir, chunk_size=max(len(ids), 1)
                )

            if index in done and (shard_dir / "chunk-00000.safetensors").exists():
                target_grads[name] = work().grads
            else:
                target_grads[name] = runner.chunk("target_gradients", index, len(ids), work).grads
        entry["complete"] = True
        progress.save()

        # 2. pool embeddings, chunks of one global length order
        store = open_store(work_dir / "lancedb", "embeddings", fingerprint, recipe, model.config.hidden_size)
        pool_ids = list(pool["sample_id"])
        order = [pool_ids[i] for i in length_order([len(x) for x in pool["input_ids"]])]
        row_of = {s: i for i, s in enumerate(pool_ids)}
        progress.stage("embeddings", len(pool_ids))
        done = runner.done_indices("embeddings")
        size = params["embed_chunk"]
        for index, start in enumerate(range(0, len(order), size)):
            chunk_ids = order[start : start + size]
            missing = store.missing_ids(chunk_ids)
            if index in done and not missing:
                continue
            if not missing:  # committed, time not recorded (no delete in the store: counted at the mean rate)
                runner.untimed("embeddings", index, len(chunk_ids))
                continue
            part = pool.select([row_of[s] for s in chunk_ids])
            runner.chunk(
                "embeddings", index, len(chunk_ids),
                lambda part=part: embed_pool(model, tokenizer, part, store, recipe.embed, commit_every=len(part)),
            )
        if store.missing_ids(pool_ids):
            raise RuntimeError(f"embeddings: {len(store.missing_ids(pool_ids))} pool samples still missing")
        progress.data["stages"]["embeddings"]["complete"] = True
        progress.save()

        # 3.-4. landmark and held-out exact gradients
        landmark_ids, holdout_ids = choose_landmarks(
            pool_ids, recipe.num_landmarks, recipe.num_holdout, recipe.seed, recipe.landmarks
        )
        chunk = params["gradient_chunk"]
        g_landmarks = _gradients_in_chunks(
            runner, "landmark_gradients", model, tokenizer, pool, landmark_ids, recipe.gradients,
            grad_dir / f"landmarks-L{len(landmark_ids)}-seed{recipe.seed}", chunk,
        ).grads
        g_holdout = _gradients_in_chunks(
            runner, "holdout_gradients", model, tokenizer, pool, holdout_ids, recipe.gradients,
            grad_dir / f"holdout-H{len(holdout_ids)}-seed{recipe.seed}", chunk,
        ).grads
    except Stopped as stop:
        print(f"[{NAME}] {stop}", flush=True)
        return None

    # 5. propagation and selection (seconds; always recomputed, recorded once)
    from idistill_core.pipeline.propagation import propagate_scores
    from idistill_core.pipeline.selection import select_samples

    lm_values = np.concatenate([landmark_values(g_landmarks, tg, "mean") for tg in target_grads.values()], axis=1)
    ho_exact = np.concatenate([landmark_values(g_holdout, tg, "mean") for tg in target_grads.values()], axis=1)
    budget = max(1, round(params["budget_fraction"] * len(pool_ids)))
    t0, c0 = time.perf_counter(), time.process_time()
    ids, scores, _ = propagate_scores(store, pool_ids, landmark_ids, lm_values, recipe.propagate)
    t1 = time.perf_counter()
    for t in range(scores.shape[1]):
        select_samples(ids, scores[:, t], budget)
    t2 = time.perf_counter()
    entry = progress.stage("propagation_selection", len(pool_ids))
    if not entry["complete"]:
        entry["chunks"] = [{"index": 0, "samples": len(pool_ids), "wall_s": round(t2 - t0, 4),
                            "propagation_s": round(t1 - t0, 4), "selection_s": round(t2 - t1, 4),
                            "cpu_s": round(time.process_time() - c0, 4), "load_average": [round(x, 2) for x in os.getloadavg()],
                            "utc": utc_now(),
                            "session": len(progress.data["sessions"]) - 1}]
        entry["complete"] = True
        progress.save()
    position = {s: i for i, s in enumerate(ids)}
    ho_predicted = scores[[position[s] for s in holdout_ids]]
    return finish(params, progress, ho_predicted, ho_exact, list(target_grads), len(landmark_ids),
                  len(holdout_ids), budget, work_dir, results_dir)


def finish(params, progress, ho_predicted, ho_exact, target_names, num_landmarks, num_holdout, budget,
           work_dir: Path, results_dir: Path | None) -> dict:
    from benchmarks.common import RESULTS_DIR, git_commit, machine_info, merge_scale_figures, write_result
    from benchmarks.workload import rank_agreement

    stages = progress.data["stages"]
    seconds = {}
    for s in STAGES:
        timed = [c for c in stages[s]["chunks"] if not c.get("untimed")]
        untimed = sum(c["samples"] for c in stages[s]["chunks"] if c.get("untimed"))
        rate = sum(c["wall_s"] for c in timed) / max(sum(c["samples"] for c in timed), 1)
        seconds[s] = sum(c["wall_s"] for c in timed) + untimed * rate
    cpu = {s: sum(c["cpu_s"] for c in stages[s]["chunks"]) for s in STAGES}
    rates = [
        c["wall_s"] / c["samples"]
        for s in ("landmark_gradients", "holdout_gradients")
        for c in stages[s]["chunks"]
        if not c.get("untimed")
    ]
    exact_rate = float(np.median(rates))
    selection_s = stages["propagation_selection"]["chunks"][0]["selection_s"]
    n = params["pool_size"]
    id_total = sum(seconds[s] for s in ID_STAGES)
    exact_total = n * exact_rate + seconds["target_gradients"] + selection_s
    agreement = rank_agreement(ho_predicted, ho_exact)
    rho = agreement["spearman"]
    loads = [c["load_average"][0] for s in STAGES for c in stages[s]["chunks"]]
    machine = machine_info()
    figures = {
        "end_to_end_10k_seconds": id_total,
        "exact_10k_seconds": exact_total,
        "speedup_vs_exact_10k": exact_total / id_total,
        "spearman_vs_exact_10k": float(np.mean(rho)),
        "spearman_vs_exact_10k_per_target": dict(zip(target_names, rho, strict=True)),
        "top10_overlap_10k_per_target": dict(zip(target_names, agreement["top_overlap"], strict=True)),
        "stage_seconds": seconds,
        "stage_cpu_seconds": cpu,
        "exact_gradient_s_per_sample_median": exact_rate,
        "embed_s_per_sample": seconds["embeddings"] / n,
        "pool_n": n,
        "num_landmarks": num_landmarks,
        "num_holdout": num_holdout,
        "budget": budget,
        "chunks_computed": {s: len(stages[s]["chunks"]) for s in STAGES},
        "chunks_untimed": {s: sum(1 for c in stages[s]["chunks"] if c.get("untimed")) for s in STAGES},
        "sessions": len(progress.data["sessions"]),
        "load_average_1min_min_median_max": [min(loads), float(np.median(loads)), max(loads)],
        "cpu": machine["cpu"],
    }
    published = all(params[k] == v for k, v in PUBLISHED.items())
    if results_dir is None:
        # only the published sizes go to the repository's results; anything else stays in the work dir
        results_dir = RESULTS_DIR if published else work_dir / "results"
    notes = [
        (
            f"N={n}, L={num_landmarks}, H={num_holdout} held-out samples (never landmarks), targets {target_names}, "
            f"{params['target_examples']} dev examples each; the main job's recipe ({params['profile']})"
        ),
        (
            "stage seconds = sum of the wall seconds of the chunks completed (over "
            f"{len(progress.data['sessions'])} process(es)); work of a killed chunk is not counted"
        ),
        "end_to_end_10k_seconds = target gradients + embeddings + landmark gradients + propagation and selection",
        (
            f"exact_10k_seconds = N x median exact-gradient s/sample over {len(rates)} landmark and held-out "
            "chunks + target gradients + selection (measured sample, scaled)"
        ),
        "spearman on the held-out samples: propagated score vs exact first-order score (mean target gradient)",
        "model loading and tokenization are left out of both sides",
    ]
    rows = [{"stage": s, **stages[s]} for s in STAGES]
    path = write_result(results_dir, NAME, "e2e10k", params, figures, rows, notes, machine, id_total)
    headline = ("end_to_end_10k_seconds", "exact_10k_seconds", "speedup_vs_exact_10k", "spearman_vs_exact_10k")
    commits = list(dict.fromkeys(x["git_commit"] for x in progress.data["sessions"] if x.get("git_commit")))
    scale_path = merge_scale_figures(results_dir, {
        **{k: figures[k] for k in headline},
        "end_to_end_10k_pool_n": n,
        "end_to_end_10k_cpu": machine["cpu"],
        "end_to_end_10k_git_commit": ",".join(commits) or git_commit(),
    })
    print(
        f"[{NAME}] complete: ID {id_total:.0f} s, exact {exact_total:.0f} s, speedup "
        f"{figures['speedup_vs_exact_10k']:.2f}x, spearman {figures['spearman_vs_exact_10k']:.3f}; wrote {path} "
        f"and {scale_path}",
        flush=True,
    )
    return figures


def status(work_dir: Path) -> str:
    path = work_dir / "progress.json"
    if not path.exists():
        return f"{path}: nothing done yet"
    data = json.loads(path.read_text())
    lines = [f"{path} ({len(data['sessions'])} session(s)); params {data['params']}"]
    for stage in STAGES:
        entry = data["stages"].get(stage)
        if entry is None:
            lines.append(f"  {stage}: not started")
            continue
        done = sum(c["samples"] for c in entry["chunks"])
        secs = sum(c["wall_s"] for c in entry["chunks"])
        rate = secs / done if done else float("nan")
        flag = "complete" if entry["complete"] else "in progress"
        lines.append(f"  {stage}: {done}/{entry['total']} samples in {len(entry['chunks'])} chunks, {secs:.0f} s "
                     f"({rate:.3f} s/sample), {flag}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.end_to_end_10k", description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="default: benchmarks/results at the published sizes, else <work-dir>/results")
    parser.add_argument("--smoke", action="store_true", help="tiny random model and pool (seconds)")
    parser.add_argument("--model")
    parser.add_argument("--pool-size", type=int)
    parser.add_argument("--landmarks", type=int)
    parser.add_argument("--holdout", type=int)
    parser.add_argument("--targets", help="comma-separated")
    parser.add_argument("--target-examples", type=int)
    parser.add_argument("--embed-chunk", type=int)
    parser.add_argument("--gradient-chunk", type=int)
    parser.add_argument("--max-chunks", type=int, default=None, help="stop after computing this many chunks")
    parser.add_argument("--status", action="store_true", help="print what is done and exit")
    args = parser.parse_args(argv)
    if args.status:
        print(status(args.work_dir))
        return 0
    params = dict(SMOKE if args.smoke else DEFAULTS)
    for key in ("model", "pool_size", "landmarks", "holdout", "target_examples", "embed_chunk", "gradient_chunk"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if args.targets:
        params["targets"] = args.targets.split(",")
    if params["landmarks"] + params["holdout"] > params["pool_size"]:
        parser.error(f"--landmarks + --holdout ({params['landmarks']} + {params['holdout']}) exceed --pool-size "
                     f"{params['pool_size']}")
    figures = run(params, args.work_dir, args.results_dir, args.max_chunks)
    print(status(args.work_dir))
    return 0 if figures is not None else 3


if __name__ == "__main__":
    sys.exit(main())
