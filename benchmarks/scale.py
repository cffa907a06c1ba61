"""Benchmark: the data plane at scale (issue 11): a real LanceDB store of synthetic embeddings of the default
dimension, the shared propagation coefficients and a new target's selection, at N = 100k and N = 1M.

Per size, two fresh child processes (so each peak RSS, ``ru_maxrss``, is that phase's own):

- ``build``: ingest N vectors (MB-sized commits), the missing-id check (anti-join) for N + 1000 ids, a read of
  10k random ids, and the coefficient table ``C (N, L)`` at L = 1024 (chunked, resumable).
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DIM = 1024
"""The default embedding dimension (EmbedConfig default proj_dim)."""


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
    from idistill_core.pipeline.propagation import shared_coefficients
    from idistill_core.steps.propagate import PropagateConfig

    store = _store(work)
    ids = _ids(n)
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, DIM)).astype(np.float32)  # clustered, as real embeddings are
    out: dict[str, Any] = {"n": n}
    start = time.perf_counter()
    step = 50_000
    for first in range(0, n, step):
        rows = min(step, n - first)
        vectors = centers[rng.integers(0, 64, rows)] + 0.5 * rng.normal(size=(rows, DIM)).astype(np.float32)
        store.insert_missing(ids[first : first + rows], vectors, optimize_after_rows=10**12)
    store.optimize()
    out["ingest_seconds"] = time.perf_counter() - start
    out["rows"] = store.count()
    start = time.perf_counter()
    missing = store.missing_ids(ids + [f"new-{i}" for i in range(1000)])
    out["missing_check_seconds"] = time.perf_counter() - start
    assert len(missing) == 1000
    wanted = [ids[i] for i in rng.choice(n, size=10_000, replace=False)]
    start = time.perf_counter()
    block = store.read(wanted)
    out["read_10k_ids_seconds_cold"] = time.perf_counter() - start
    assert block.shape == (10_000, DIM)
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
        if key == "1m":
            figures["new_target_seconds_1m"] = round(max(record["target"]["new_target_seconds"]), 2)
            figures["coefficients_seconds_1m"] = round(record["build"]["coefficients_seconds"], 1)
            figures["read_10k_ids_seconds_1m"] = round(record["build"]["read_10k_ids_seconds_cold"], 3)
    return figures


def run(params: dict, results_dir: Path, work_dir: Path, profile: str, machine: dict) -> dict:
    """Suite entry (benchmarks/run.py): measure, write ``scale.json``, return its figures."""
    from benchmarks.common import write_json_atomic

    per_size = measure(
        params["sizes"], params["num_landmarks"], params["targets"], params.get("seed", 0), Path(work_dir)
    )
    figures = figures_from(per_size)
    path = Path(results_dir, "scale.json")
    # other benchmarks merge their headline figures into scale.json (end_to_end_10k, second_order_memory): keep them
    previous = json.loads(path.read_text()).get("figures", {}) if path.exists() else {}
    own = {f"peak_rss_gib_{k}" for k in ("100k", "1m")} | {
        "new_target_seconds_1m", "coefficients_seconds_1m", "read_10k_ids_seconds_1m"
    }
    figures_all = {**{k: v for k, v in previous.items() if k not in own}, **figures}
    record = {
        "benchmark": "scale",
        "profile": profile,
        "machine": machine,
        "params": params,
        "sizes": per_size,
        "figures": figures_all,
        "n_reached": max(int(n) for n in per_size),
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
    parser.add_argument("--out", default="benchmarks/results/scale.json")
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
    if out.name != "scale.json":
        Path(out.parent, "scale.json").rename(out)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
