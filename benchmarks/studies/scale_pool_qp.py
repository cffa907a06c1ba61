"""The second-order pool QP at N = 1M, L = 4,096 (issue 24): from a real Lance coefficient table and a raw file.

Synthetic float32 coefficients shaped like KRR rows (a few large weights on nearby landmarks, small dense noise)
are written (a) into a LanceDB table exactly as ``build_coefficients`` writes one (``CoefficientTable.arrow_schema``
and ``append_rows``: one insert-if-missing commit per 16,384 rows), at ``--lance-n`` rows, and (b) into a raw
float32 file at ``--file-n`` rows, streamed by :class:`FileTable` (plain reads into fresh buffers, no memory map:
the peak RSS stays the solver's own). On this shared 2-core VM the Lance writer ran at ~7 MB/s (16 GiB: ~40 min),
so N = 1M is measured on the file and the Lance pass cost measured at ``--lance-n`` is scaled to 1M. The landmark terms are synthetic too: ``p_L``
standard normal, ``Q_L = c X Xᵀ / L²`` (PSD, full rank, ``X`` L × L normal) or that minus a small rank-2 part (indefinite, a Hessian's
negative directions, so the setup pass also accumulates ``CᵀC``). Each solve runs in its own child process
(``benchmarks.common.run_child``), so its peak RSS is its own.

- ``working_set`` (the default solver): ``steps.pool_qp.solve_pool_qp``; reported: passes over the table, KKT rounds,
  working rows, operator applications (each on the working rows only), time, peak RSS.
- ``full`` (the solver before issue 24) cannot run at this size (two 16 GiB passes per operator application): its
  cost is extrapolated from the measured time of one pass and the applications it took at small N.
- side by side at a small size (N = 8,000, L = 256, the table in memory): both solvers on the same problem in one
  run, same support asserted.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.studies.scale_pool_qp --work /tmp/qp-scale`` (writes
``benchmarks/results/scale_pool_qp.json``; needs ~16.5 GiB of disk at N = 1M, L = 4,096, deleted afterwards
unless ``--keep``).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS_DIR, machine_info, run_child, utc_now, write_json_atomic

TABLE = "coefficients_bench"
CHUNK = 16384


def _rows(first: int, count: int, num_l: int, seed: int) -> np.ndarray:
    """KRR-like coefficient rows ``first .. first+count``: 8 landmarks with weights summing to ~1 plus dense
    noise of 1e-3 (seeded per row block, so any block is reproducible alone)."""
    rng = np.random.default_rng([seed, first])
    out = rng.standard_normal((count, num_l), dtype=np.float32)
    out *= np.float32(1e-3)
    cols = rng.integers(0, num_l, size=(count, 8))
    weights = rng.dirichlet(np.ones(8), size=count).astype(np.float32)
    np.add.at(out, (np.repeat(np.arange(count), 8), cols.reshape(-1)), weights.reshape(-1))
    return out


def write_table(work: str, n: int, num_l: int, seed: int = 0) -> dict:
    """The synthetic table in ``work/lancedb`` (skipped when it exists with ``n`` rows)."""
    import lancedb
    import pyarrow as pa

    from idistill_core.pipeline.propagation import CoefficientTable

    uri = str(Path(work) / "lancedb")
    db = lancedb.connect(uri)
    landmark_ids = [f"lm{j:05d}" for j in range(num_l)]
    if TABLE in db.list_tables().tables:
        if db.open_table(TABLE).count_rows() == n:
            return {"uri": uri, "seconds": 0.0, "reused": True}
        db.drop_table(TABLE)
    schema = CoefficientTable.arrow_schema(landmark_ids, "float32", {"spec": "bench"})
    table = db.create_table(TABLE, schema=schema)
    start = time.perf_counter()
    for number, first in enumerate(range(0, n, CHUNK)):
        count = min(CHUNK, n - first)
        ids = pa.array([f"s{i:08d}" for i in range(first, first + count)], pa.string())
        CoefficientTable.append_rows(table, schema, ids, _rows(first, count, num_l, seed), number)
    seconds = time.perf_counter() - start
    return {"uri": uri, "seconds": round(seconds, 1), "reused": False, "bytes": _size(Path(uri) / f"{TABLE}.lance")}


class FileTable:
    """A ``ChunkSource`` over a raw row-major float32 ``(N, L)`` file: blocks read with ``np.fromfile`` (a fresh
    buffer per block, like a Lance read), ids ``s00000000``... in row order."""

    def __init__(self, path: str, n: int, num_l: int):
        self.path, self.n, self.num_landmarks = path, n, num_l

    def count(self) -> int:
        return self.n

    def iter_chunks(self, batch_rows: int = CHUNK):
        with open(self.path, "rb") as handle:
            for first in range(0, self.n, batch_rows):
                count = min(batch_rows, self.n - first)
                block = np.fromfile(handle, dtype=np.float32, count=count * self.num_landmarks)
                yield [f"s{i:08d}" for i in range(first, first + count)], block.reshape(count, self.num_landmarks)


def write_file(work: str, n: int, num_l: int, seed: int = 0) -> dict:
    """The same synthetic rows as :func:`write_table`, as one raw float32 file."""
    path = Path(work) / f"coefficients_{n}x{num_l}.f32"
    if path.exists() and path.stat().st_size == n * num_l * 4:
        return {"path": str(path), "seconds": 0.0, "reused": True}
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for first in range(0, n, CHUNK):
            _rows(first, min(CHUNK, n - first), num_l, seed).tofile(handle)
    return {"path": str(path), "seconds": round(time.perf_counter() - start, 1), "reused": False, "bytes": path.stat().st_size}


def _source(where: str, n: int, num_l: int):
    if where.endswith(".f32"):
        return FileTable(where, n, num_l)
    from idistill_core.pipeline.propagation import CoefficientTable

    return CoefficientTable.open(where, TABLE)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _terms(num_l: int, seed: int, indefinite: bool, curvature: float):
    import torch

    from idistill_core.steps.second_order import SecondOrderTerms

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_l, num_l, generator=gen, dtype=torch.float64)  # full rank, as Q_L is (L < its sketch)
    q = curvature * (x @ x.T) / num_l**2
    if indefinite:
        y = torch.randn(num_l, 2, generator=gen, dtype=torch.float64)
        q = q - 0.0005 * curvature * (y @ y.T) / num_l
    p = torch.randn(num_l, generator=gen, dtype=torch.float64)
    return SecondOrderTerms(p=p, q=q, lr=0.5, num_source=num_l)


def solve(uri: str, k: int, solver: str, indefinite: bool = False, curvature: float = 20.0,
          memory_limit_mib: int = 2048, seed: int = 0, n: int = 0, num_l: int = 0) -> dict:
    """One ``solve_pool_qp`` on the table or file (a child process: its peak RSS is this solve's)."""
    import torch

    from idistill_core.steps import pool_qp as qp

    torch.set_num_threads(1)
    table = _source(uri, n, num_l)
    terms = _terms(table.num_landmarks, seed, indefinite, curvature)
    applications = 0
    real = qp._WorkingSetQuadratic.__call__

    def counted(self, v):
        nonlocal applications
        applications += 1
        return real(self, v)

    qp._WorkingSetQuadratic.__call__ = counted
    start = time.perf_counter()
    result = qp.solve_pool_qp(table, terms, k, config=qp.PoolQPConfig(solver=solver, memory_limit_mib=memory_limit_mib))
    seconds = time.perf_counter() - start
    w = result.solution.weights
    top = set(torch.topk(result.p_pool, k).indices.tolist())
    support = set(torch.nonzero(w).flatten().tolist())
    return {
        "source": "raw file" if uri.endswith(".f32") else "lance table",
        "n": result.n, "landmarks": table.num_landmarks, "k": k, "solver": result.solver, "indefinite": indefinite,
        "seconds": round(seconds, 1), "passes": result.passes, "rounds": result.rounds,
        "working_rows": result.working_rows, "applications": applications, "exact": result.solution.exact,
        "nonzero": result.solution.num_nonzero, "lambda": result.solution.lam, "lam_floor": result.solution.lam_floor,
        "support_outside_top_k_of_p": len(support - top),
    }


def one_pass(uri: str, batch_rows: int = CHUNK, n: int = 0, num_l: int = 0) -> dict:
    """Seconds of one pass over the table computing ``C u`` (what every operator application of the full solver
    costs twice when the table is streamed)."""
    import torch

    torch.set_num_threads(1)
    table = _source(uri, n, num_l)
    u = torch.randn(table.num_landmarks, dtype=torch.float32)
    start = time.perf_counter()
    rows = 0
    for _, block in table.iter_chunks(batch_rows):
        torch.from_numpy(block) @ u
        rows += len(block)
    return {"rows": rows, "seconds": round(time.perf_counter() - start, 2)}


def side_by_side(n: int, num_l: int, k: int, seed: int = 0) -> dict:
    """Both solvers on one small in-memory problem: applications, passes over C, time, same support."""
    import torch

    from idistill_core.steps import pool_qp as qp

    torch.set_num_threads(1)
    c = torch.from_numpy(_rows(0, n, num_l, seed))
    terms = _terms(num_l, seed, False, 20.0)
    out = {}
    for solver in ("full", "working_set"):
        applications = 0
        real_ws, real_full = qp._WorkingSetQuadratic.__call__, qp.PoolQuadratic.__call__

        def ws(self, v, real=real_ws):
            nonlocal applications
            applications += 1
            return real(self, v)

        def full(self, v, real=real_full):
            nonlocal applications
            applications += 1
            return real(self, v)

        qp._WorkingSetQuadratic.__call__, qp.PoolQuadratic.__call__ = ws, full
        try:
            start = time.perf_counter()
            result = qp.solve_pool_qp(c, terms, k, config=qp.PoolQPConfig(solver=solver))
            seconds = time.perf_counter() - start
        finally:
            qp._WorkingSetQuadratic.__call__, qp.PoolQuadratic.__call__ = real_ws, real_full
        # the full solver's passes: each application is Cᵀv then C r (two sweeps), plus setup and p_pool
        passes = result.passes if solver == "working_set" else 2 * applications + 2
        out[solver] = {"seconds": round(seconds, 2), "applications": applications, "passes": passes,
                       "support": sorted(torch.nonzero(result.solution.weights).flatten().tolist()),
                       "exact": result.solution.exact, "lambda": result.solution.lam}
    same = out["full"]["support"] == out["working_set"]["support"]
    for v in out.values():
        v["support"] = len(v["support"])
    return {"n": n, "landmarks": num_l, "k": k, "same_support": same, **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--lance-n", type=int, default=250_000)
    parser.add_argument("--file-n", type=int, default=1_000_000)
    parser.add_argument("--landmarks", type=int, default=4096)
    parser.add_argument("--k", type=int, default=10_000)
    parser.add_argument("--indefinite", action="store_true", help="also solve with an indefinite Q_L (file)")
    parser.add_argument("--side-by-side", action="store_true", help="both solvers at N = 8,000, L = 256")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    out = RESULTS_DIR / "scale_pool_qp.json"
    record = {"machine": machine_info(), "started": utc_now(), "parameters": vars(args), "solves": []}
    if args.side_by_side:
        record["side_by_side"] = run_child("studies.scale_pool_qp", "side_by_side", {"n": 8000, "num_l": 256, "k": 100})
        print("side by side:", record["side_by_side"], flush=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    need = (args.lance_n + args.file_n) * args.landmarks * 4 * 1.05
    free = shutil.disk_usage(work).free
    if free < need + 8 * 2**30:
        raise SystemExit(f"{work}: {free / 2**30:.1f} GiB free; the tables need {need / 2**30:.1f} GiB plus 8 GiB left over")
    num_l, k = args.landmarks, args.k
    if args.lance_n:
        record["write_lance"] = run_child("studies.scale_pool_qp", "write_table", {"work": str(work), "n": args.lance_n, "num_l": num_l})
        print("write lance:", record["write_lance"], flush=True)
        uri = record["write_lance"]["uri"]
        record["pass_lance"] = run_child("studies.scale_pool_qp", "one_pass", {"uri": uri})
        print("pass lance:", record["pass_lance"], flush=True)
        result = run_child("studies.scale_pool_qp", "solve", {"uri": uri, "k": k, "solver": "working_set"})
        print("solve:", result, flush=True)
        record["solves"].append(result)
        write_json_atomic(out, record)
    if args.file_n:
        record["write_file"] = run_child("studies.scale_pool_qp", "write_file", {"work": str(work), "n": args.file_n, "num_l": num_l})
        print("write file:", record["write_file"], flush=True)
        path = record["write_file"]["path"]
        record["pass_file"] = run_child("studies.scale_pool_qp", "one_pass", {"uri": path, "n": args.file_n, "num_l": num_l})
        print("pass file:", record["pass_file"], flush=True)
        for indefinite in [False] + ([True] if args.indefinite else []):
            result = run_child("studies.scale_pool_qp", "solve", {"uri": path, "k": k, "solver": "working_set",
                                                                  "indefinite": indefinite, "n": args.file_n, "num_l": num_l})
            print("solve:", result, flush=True)
            record["solves"].append(result)
            write_json_atomic(out, record)
    record["finished"] = utc_now()
    write_json_atomic(out, record)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
