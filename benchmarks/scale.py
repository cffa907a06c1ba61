"""Benchmark: the data plane at scale (issue 11): a real LanceDB store of synthetic embeddings of the default
dimension, the shared propagation coefficients and a new target's selection, at N = 100k and N = 1M.

Per size, two fresh child processes (so each peak RSS, ``ru_maxrss``, is that phase's own):

- ``build``: ingest N vectors through the pipeline's own writer (``pipeline.embeddings._fill_store``, what
  ``embed_pool`` runs for the local and the Ray backend: batches of 8, a commit every 256 rows), so the table is
  the one production leaves; reads of 100, 1,000 and 10,000 random ids, a chunked pass over 40,960 pool ids in
  order (the coefficient build's pattern) and the missing-id check (anti-join) for N + 1000 ids, timed side by
  side (5 repeats, alternating) on the table as committed (the Lance version before the writer's closing
  ``optimize()``, read by time travel) and as the writer leaves it; then the coefficient table ``C (N, L)`` at
  L = 1024 (chunked, resumable) on the optimised table.
- ``target``: three new targets, each: landmark values ``V = G_L ḡ_T`` from stored landmark and target
  sketches, ``C · V`` streamed from the coefficient table, top-k with simplex weights. No target gradients
  (they cost the same at any N). Also a second 10k-id read with the table already built.

    nice python -m benchmarks.scale --sizes 100000 1000000 --out benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DIM = 1024
"""The default embedding dimension (EmbedConfig default proj_dim)."""
COMMIT_EVERY = 256
"""``embed_pool``'s default ``commit_every``."""
READ_REPEATS = 5
"""Repeats of every read per table state, alternating the state read first."""
READ_SIZES = (100, 1000, 10_000)
"""Random id sets read side by side (besides a chunked pass over 40,960 pool ids and the missing-id check)."""
BATCH = 8
"""The default ``EmbedConfig.batch_size``: what each backend batch hands the writer."""


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _ids(n: int) -> list[str]:
    return [f"sample-{i:08d}" for i in range(n)]


def _store(work: Path):
    from idistill_core.store.lance import EmbeddingStore, StoreIdentity

    return EmbeddingStore.open(work / "lancedb", "embeddings", StoreIdentity("synthetic", "scale-bench", DIM))


def _landmarks(n: int, num_landmarks: int, seed: int) -> list[str]:
    ids = _ids(n)
    return [ids[i] for i in np.random.default_rng(seed).choice(n, size=num_landmarks, replace=False)]


def child_build(n: int, work: Path, num_landmarks: int, seed: int) -> dict[str, Any]:
    from idistill_core.pipeline.embeddings import _fill_store
    from idistill_core.pipeline.propagation import shared_coefficients
    from idistill_core.steps.propagate import PropagateConfig

    store = _store(work)
    ids = _ids(n)
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, DIM)).astype(np.float32)  # clustered, as real embeddings are
    out: dict[str, Any] = {"n": n, "commit_every": COMMIT_EVERY, "batch_size": BATCH}

    def stream():  # what a backend yields: (ids, vectors) per batch of the embedding config's size
        for first in range(0, n, COMMIT_EVERY):
            rows = min(COMMIT_EVERY, n - first)
            vectors = centers[rng.integers(0, 64, rows)] + 0.5 * rng.normal(size=(rows, DIM)).astype(np.float32)
            for b in range(0, rows, BATCH):
                yield ids[first + b : first + min(b + BATCH, rows)], vectors[b : b + BATCH]

    closing = store.optimize

    def held_back() -> dict:  # the writer's closing optimize, held back: it is called (and timed) below
        layout = store.layout()
        return {"seconds": 0.0, "before": layout, "after": layout}

    store.optimize = held_back
    start = time.perf_counter()
    _fill_store(store, stream(), n, n, 0.0, start, COMMIT_EVERY, None, "embeddings")
    out["ingest_seconds"] = time.perf_counter() - start
    del store.optimize
    out["rows"] = store.count()
    committed = store.version
    out["layout_as_committed"] = store.layout()
    start = time.perf_counter()
    out["optimize"] = closing()
    out["optimize_seconds"] = time.perf_counter() - start
    out["layout_optimized"] = store.layout()
    # Both states side by side: the version as committed stays readable (time travel; optimize prunes only versions
    # older than 7 days), so each repeat reads the same 10k random ids from both, alternating which goes first.
    states = {"as_committed": store.at_version(committed), "optimized": store.at_version(store.version)}
    reads = {f"read_{size}_random": size for size in READ_SIZES} | {"pool_chunks_40960": None, "missing_check": None}
    timings: dict[str, dict[str, list[float]]] = {state: {r: [] for r in reads} for state in states}
    probe_ids = ids + [f"new-{i}" for i in range(1000)]
    for repeat in range(READ_REPEATS):
        wanted = {r: [ids[i] for i in rng.choice(n, size=size, replace=False)] for r, size in reads.items() if size}
        first = rng.integers(0, n - 40_960)
        for state in list(states) if repeat % 2 == 0 else list(states)[::-1]:
            view = states[state]
            for r in reads:
                start = time.perf_counter()
                if r == "missing_check":
                    assert len(view.missing_ids(probe_ids)) == 1000
                elif r == "pool_chunks_40960":  # how the coefficient build reads the pool: 4,096 ids per chunk
                    for _ in view.iter_chunks(4096, sample_ids=ids[first : first + 40_960]):
                        pass
                else:
                    assert view.read(wanted[r]).shape == (len(wanted[r]), DIM)
                timings[state][r].append(time.perf_counter() - start)
    out["reads"] = {
        r: {
            **{f"{state}_s": round(statistics.median(timings[state][r]), 4) for state in states},
            "as_committed_over_optimized_per_repeat": [
                round(a / b, 2) for a, b in zip(timings["as_committed"][r], timings["optimized"][r], strict=True)
            ],
        }
        for r in reads
    }
    for record in out["reads"].values():  # paired: the median of the per-repeat ratios (load hits a pair alike)
        record["as_committed_over_optimized"] = statistics.median(record["as_committed_over_optimized_per_repeat"])
    out["read_10k_ids_seconds_as_committed"] = out["reads"]["read_10000_random"]["as_committed_s"]
    out["read_10k_ids_seconds_optimized"] = out["reads"]["read_10000_random"]["optimized_s"]
    out["missing_check_seconds"] = out["reads"]["missing_check"]["optimized_s"]
    out["read_10k_ids_seconds_cold"] = timings["optimized"]["read_10000_random"][0]
    # a later pass appending 256 rows to the full table: what its closing optimize costs (bounded fragments)
    extra = [f"late-{i}" for i in range(COMMIT_EVERY)]
    start = time.perf_counter()
    _fill_store(store, iter([(extra, rng.normal(size=(len(extra), DIM)).astype(np.float32))]), n + len(extra),
                len(extra), 0.0, start, COMMIT_EVERY, None, "embeddings")
    out["append_256_with_optimize_seconds"] = time.perf_counter() - start
    out["layout_after_append"] = store.layout()
    landmarks = _landmarks(n, num_landmarks, seed)
    start = time.perf_counter()
    _table, report = shared_coefficients(store, ids, landmarks, PropagateConfig())
    out["coefficients_seconds"] = time.perf_counter() - start
    out["coefficients_rows"] = report.rows
    out["coefficients_table"] = report.table
    out["coefficients_version"] = report.version
    out["peak_rss_gib"] = _rss_gib()
    return out


def child_target(n: int, work: Path, table: str, version: int, num_landmarks: int, seed: int, targets: int):
    import torch

    from idistill_core.pipeline.propagation import CoefficientTable
    from idistill_core.pipeline.selection import select_samples
    from idistill_core.steps.influence import landmark_values

    store = _store(work)
    ids = _ids(n)
    rng = np.random.default_rng(seed + 1)
    wanted = [ids[i] for i in rng.choice(n, size=10_000, replace=False)]
    start = time.perf_counter()
    store.read(wanted)
    read_warm = time.perf_counter() - start
    coefficients = CoefficientTable.open(str(work / "lancedb"), table, version)
    proj = 8192  # the default gradient sketch size
    g_landmarks = torch.nn.functional.normalize(
        torch.randn(num_landmarks, proj, generator=torch.Generator().manual_seed(seed)), dim=1
    )
    seconds = []
    for t in range(targets):
        g_target = torch.nn.functional.normalize(
            torch.randn(16, proj, generator=torch.Generator().manual_seed(100 + t)), dim=1
        )
        start = time.perf_counter()
        values = landmark_values(g_landmarks, g_target, "mean")
        pool_ids, scores = coefficients.propagate(values)
        outcome = select_samples(pool_ids, scores, max(1, n // 20))
        seconds.append(time.perf_counter() - start)
        assert len(outcome.selected) == max(1, n // 20) and len(pool_ids) == n
    return {"new_target_seconds": seconds, "read_10k_ids_seconds_warm": read_warm, "peak_rss_gib": _rss_gib()}


def _spawn(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--child", *args],
        check=False,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(sizes: list[int], num_landmarks: int, targets: int, seed: int, work_root: Path) -> dict[str, Any]:
    import shutil

    per_size = {}
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"scale-{n}-", dir=work_root))
        try:
            load_before = os.getloadavg()
            build = _spawn(["build", str(n), str(work), str(num_landmarks), str(seed)])
            target = _spawn(
                [
                    "target",
                    str(n),
                    str(work),
                    build["coefficients_table"],
                    str(build["coefficients_version"]),
                    str(num_landmarks),
                    str(seed),
                    str(targets),
                ]
            )
            per_size[str(n)] = {
                "build": build,
                "target": target,
                "load_before": load_before,
                "load_after": os.getloadavg(),
            }
            print(json.dumps({str(n): per_size[str(n)]}), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return per_size


def figures_from(per_size: dict[str, Any]) -> dict[str, float]:
    figures: dict[str, float] = {}
    for n, key in ((100_000, "100k"), (1_000_000, "1m")):
        record = per_size.get(str(n))
        if record is None:
            continue
        figures[f"peak_rss_gib_{key}"] = round(record["target"]["peak_rss_gib"], 3)
        build = record["build"]
        if "reads" in build:
            for read, ratio in build["reads"].items():
                figures[f"{read}_as_committed_over_optimized_{key}"] = ratio["as_committed_over_optimized"]
            figures[f"optimize_seconds_{key}"] = round(build["optimize_seconds"], 1)
            figures[f"fragments_as_committed_{key}"] = build["layout_as_committed"]["fragments"]
        if key == "1m":
            figures["new_target_seconds_1m"] = round(max(record["target"]["new_target_seconds"]), 2)
            figures["coefficients_seconds_1m"] = round(build["coefficients_seconds"], 1)
            figures["read_10k_ids_seconds_1m"] = round(build["read_10k_ids_seconds_cold"], 3)
    return figures


def run(params: dict, results_dir: Path, work_dir: Path, profile: str, machine: dict) -> dict:
    """Suite entry (benchmarks/run.py): measure, write ``scale.json``, return its figures."""

    per_size = measure(
        params["sizes"], params["num_landmarks"], params["targets"], params.get("seed", 0), Path(work_dir)
    )
    return write_scale(per_size, params, results_dir, profile, machine)


def write_scale(per_size: dict, params: dict, results_dir: Path, profile: str, machine: dict) -> dict:
    """Merge one run's sizes and figures into ``scale.json`` (sizes and figures of other runs are kept)."""
    from benchmarks.common import write_json_atomic

    figures = figures_from(per_size)
    path = Path(results_dir, "scale.json")
    # other benchmarks merge their headline figures into scale.json (end_to_end_10k, second_order_memory): keep them
    before = json.loads(path.read_text()) if path.exists() else {}
    previous = before.get("figures", {})
    own = {f"peak_rss_gib_{k}" for k in ("100k", "1m")} | {
        "new_target_seconds_1m", "coefficients_seconds_1m", "read_10k_ids_seconds_1m"
    } | {f"{f}_{k}" for f in ("optimize_seconds", "fragments_as_committed") for k in ("100k", "1m")} | {
        f"{r}_as_committed_over_optimized_{k}" for r in [*(f"read_{s}_random" for s in READ_SIZES),
                                                         "pool_chunks_40960", "missing_check"]
        for k in ("100k", "1m")}
    figures_all = {**{k: v for k, v in previous.items() if k not in own}, **figures}
    record = {
        "benchmark": "scale",
        "profile": profile,
        "machine": machine,
        "params": params,
        "sizes": {**before.get("sizes", {}), **per_size},
        "figures": figures_all,
        "n_reached": max(int(n) for n in {**before.get("sizes", {}), **per_size}),
    }
    write_json_atomic(path, record)
    return figures


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "build":
            result = child_build(int(rest[0]), Path(rest[1]), int(rest[2]), int(rest[3]))
        else:
            result = child_target(
                int(rest[0]), Path(rest[1]), rest[2], int(rest[3]), int(rest[4]), int(rest[5]), int(rest[6])
            )
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--landmarks", type=int, default=1024)
    parser.add_argument("--targets", type=int, default=3)
    parser.add_argument("--work-dir", default=tempfile.gettempdir())
    parser.add_argument("--out", default="benchmarks/results/scale.json", help="its folder gets scale.json (merged)")
    args = parser.parse_args()
    from benchmarks.common import git_commit, machine_info, utc_now

    params = {
        "sizes": args.sizes,
        "num_landmarks": args.landmarks,
        "targets": args.targets,
        "seed": 0,
        "dim": DIM,
    }
    machine = {**machine_info(), "started_utc": utc_now(), "git_commit": git_commit()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = run(params, out.parent, Path(args.work_dir), "cli", machine)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
