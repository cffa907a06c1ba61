"""Coefficient tables keyed by content at N = 1M (issue 24): what an append to the pool costs.

A real LanceDB embedding store of N synthetic clustered vectors (D = 1,024, float16, committed in 64 MB
merge-inserts and optimized, as ``insert_missing`` does), then ``build_coefficients`` (L landmarks, RBF, default
ridge) four times, each timed in this process with the kernel rows it computed counted:

1. the first build (every row: what every append cost before issue 24, when tables were named by the embeddings
   table's Lance version);
2. after another pool's 1,000 rows are appended to the embeddings table and the table is compacted
   (``EmbeddingStore.optimize``): a new Lance version, same pool, same landmarks;
3. after ONE new row joins the store and the pool;
4. after 10,000 more rows join the store and the pool.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.studies.scale_coefficients --work /tmp/coef-scale`` (writes
``benchmarks/results/scale_coefficients.json``; ~2 GiB of embeddings + 4 GiB of coefficients at N = 1M, L = 1,024,
deleted afterwards unless ``--keep``).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS_DIR, machine_info, run_child, utc_now, write_json_atomic


def _vectors(first: int, count: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, first])
    centres = np.random.default_rng(seed).normal(scale=3.0, size=(256, d)).astype(np.float32)
    return centres[rng.integers(0, 256, count)] + rng.standard_normal((count, d), dtype=np.float32)


def run(work: str, n: int, d: int, landmarks: int, seed: int = 0) -> dict:
    import torch

    from idistill_core.pipeline.propagation import build_coefficients
    from idistill_core.steps.propagate import KernelRidge, PropagateConfig
    from idistill_core.store.lance import EmbeddingStore, StoreIdentity

    torch.set_num_threads(1)
    uri = str(Path(work) / "lancedb")
    store = EmbeddingStore.open(uri, "embeddings", StoreIdentity("synthetic", "bench", d))
    out: dict = {"n": n, "d": d, "landmarks": landmarks}
    start = time.perf_counter()
    ids = [f"s{i:08d}" for i in range(n)]
    for first in range(0, n, 65536):
        count = min(65536, n - first)
        store.insert_missing(ids[first : first + count], _vectors(first, count, d, seed), optimize_after_rows=10**9)
    store.optimize()
    out["ingest_s"] = round(time.perf_counter() - start, 1)
    pool = list(ids)
    lm = [pool[i] for i in np.random.default_rng(seed).choice(n, size=landmarks, replace=False)]
    rows = 0
    real = KernelRidge.coefficients

    def counted(model, x):
        nonlocal rows
        rows += len(x)
        return real(model, x)

    KernelRidge.coefficients = counted
    steps = []

    def build(label: str, pool_ids: list[str]) -> None:
        nonlocal rows
        rows = 0
        start = time.perf_counter()
        _, report = build_coefficients(store, pool_ids, lm, PropagateConfig())
        seconds = time.perf_counter() - start
        steps.append({"step": label, "seconds": round(seconds, 2), "kernel_rows": rows, "rows": report.rows,
                      "rows_computed": report.rows_computed, "rows_reused": report.rows_reused,
                      "table": report.table, "lance_version": report.version, "embeddings_version": store.version})
        print(steps[-1], flush=True)

    build("first build (all rows)", pool)
    other = [f"other{i:06d}" for i in range(1000)]
    store.insert_missing(other, _vectors(n, 1000, d, seed + 1))
    store.optimize()
    build("another pool appended + store compacted", pool)
    pool.append("new00000000")
    store.insert_missing(["new00000000"], _vectors(n + 1000, 1, d, seed + 2))
    build("one row appended", pool)
    more = [f"new{i:08d}" for i in range(1, 10_001)]
    store.insert_missing(more, _vectors(n + 1001, 10_000, d, seed + 3))
    pool += more
    build("10,000 rows appended", pool)
    KernelRidge.coefficients = real
    out["steps"] = steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--landmarks", type=int, default=1024)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine_info(), "started": utc_now(), "parameters": vars(args)}
    record["result"] = run_child("studies.scale_coefficients", "run", {"work": str(work), "n": args.n, "d": args.d, "landmarks": args.landmarks})
    record["finished"] = utc_now()
    write_json_atomic(RESULTS_DIR / "scale_coefficients.json", record)
    print(record["result"])
    if not args.keep:
        shutil.rmtree(work / "lancedb", ignore_errors=True)


if __name__ == "__main__":
    main()
