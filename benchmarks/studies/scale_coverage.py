"""Coverage landmark strategies at N = 1M, D = 1,024 (issue 24): float32 embeddings, norms computed once.

Synthetic clustered float32 embeddings (1,000 centres, unit noise), as ``store.read`` returns them. Each
measurement runs in its own child process (``benchmarks.common.run_child``: its own peak RSS):

- ``kcenter`` and ``kmeanspp`` through ``steps.landmarks.choose`` (the pipeline's entry: ids sorted, held-out rows
  excluded without a copy), ``--picks`` landmarks; every pick costs the same (one matrix-vector product over
  N × D and O(N) vector work), so the time for L = 4,096 is the per-pick time × 4,096 plus the setup (reported
  separately, with the first and last 64 picks' times to show the cost per pick is flat);
- ``leverage`` (1,000 Nyström columns), the whole strategy;
- side by side at N = 100k (same process, same data): the implementation before issue 24 (float64 copies, ‖x‖²
  recomputed per pick; written out here) against the current one, per pick.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.studies.scale_coverage`` (writes
``benchmarks/results/scale_coverage.json``; the 1M child holds the 4 GiB of embeddings).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import RESULTS_DIR, machine_info, run_child, utc_now, write_json_atomic


def _embeddings(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(1000, d)).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 65536):
        count = min(65536, n - start)
        out[start : start + count] = rng.standard_normal((count, d), dtype=np.float32)
        out[start : start + count] += centres[rng.integers(0, 1000, count)]
    return out


def strategy(n: int, d: int, strategy: str, picks: int, holdout: int = 1000, seed: int = 0) -> dict:
    """One strategy through ``choose`` on N × D float32 embeddings; per-pick times from an instrumented run."""
    from idistill_core.steps import landmarks

    start = time.perf_counter()
    emb = _embeddings(n, d, seed)
    ids = [f"s{i:08d}" for i in range(n)]
    generate = time.perf_counter() - start
    stamps: list[float] = []
    real = landmarks._Distances.to

    def to(self, candidate):
        out = real(self, candidate)
        stamps.append(time.perf_counter())
        return out

    landmarks._Distances.to = to
    config = landmarks.LandmarkConfig(strategy=strategy, leverage_columns=1000)
    start = time.perf_counter()
    chosen, _ = landmarks.choose(ids, picks, holdout, seed, config, emb)
    seconds = time.perf_counter() - start
    landmarks._Distances.to = real
    out = {"n": n, "d": d, "strategy": strategy, "landmarks": picks, "seconds": round(seconds, 2),
           "generate_seconds": round(generate, 1), "distinct": len(set(chosen)) == picks}
    if stamps:
        steps = np.diff(stamps)
        out["setup_seconds"] = round(stamps[0] - start, 2)  # sort ids, norms, first distances
        out["per_pick_s"] = round(float(steps.mean()), 4)
        out["first_64_per_pick_s"] = round(float(steps[:64].mean()), 4)
        out["last_64_per_pick_s"] = round(float(steps[-64:].mean()), 4)
        out["extrapolated_4096_s"] = round(out["setup_seconds"] + 4095 * out["per_pick_s"], 0)
    return out


def _before(emb: np.ndarray, count: int, rng: np.random.Generator, kind: str) -> list[int]:
    """The strategies before issue 24 (float64 copy, ‖x‖² over N × D recomputed at every pick)."""

    def sq(x, y):
        return np.maximum((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T, 0.0)

    sub = np.asarray(emb, dtype=np.float64)
    chosen = [int(rng.integers(len(sub)))]
    nearest = sq(sub, sub[[chosen[0]]])[:, 0]
    nearest[chosen] = 0.0 if kind == "kmeanspp" else -1.0
    while len(chosen) < count:
        pick = int(rng.choice(len(sub), p=nearest / nearest.sum())) if kind == "kmeanspp" else int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, sq(sub, sub[[pick]])[:, 0])
        nearest[chosen] = 0.0 if kind == "kmeanspp" else -1.0
    return chosen


def side_by_side(n: int, d: int, picks: int, seed: int = 0) -> dict:
    """Before vs now on the same embeddings, same seed, in one process: seconds per pick and the same picks."""
    from idistill_core.steps import landmarks

    emb = _embeddings(n, d, seed)
    out = {"n": n, "d": d, "landmarks": picks}
    for kind in ("kcenter", "kmeanspp"):
        start = time.perf_counter()
        old = _before(emb, picks, np.random.default_rng(seed), kind)
        t_old = time.perf_counter() - start
        start = time.perf_counter()
        new = getattr(landmarks, kind)(emb, picks, np.random.default_rng(seed))
        t_new = time.perf_counter() - start
        out[kind] = {"before_s": round(t_old, 2), "now_s": round(t_new, 2), "ratio": round(t_old / t_new, 1),
                     "same_picks": old == new}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--picks", type=int, default=256)
    parser.add_argument("--strategies", nargs="+", default=["kcenter", "kmeanspp", "leverage"])
    args = parser.parse_args()
    out = RESULTS_DIR / "scale_coverage.json"
    record = {"machine": machine_info(), "started": utc_now(), "parameters": vars(args), "runs": []}
    record["side_by_side"] = run_child("studies.scale_coverage", "side_by_side", {"n": 100_000, "d": args.d, "picks": 16})
    print("side by side:", record["side_by_side"], flush=True)
    write_json_atomic(out, record)
    for name in args.strategies:
        picks = 4096 if name == "leverage" else args.picks
        result = run_child("studies.scale_coverage", "strategy", {"n": args.n, "d": args.d, "strategy": name, "picks": picks})
        print(result, flush=True)
        record["runs"].append(result)
        write_json_atomic(out, record)
    record["finished"] = utc_now()
    write_json_atomic(out, record)


if __name__ == "__main__":
    main()
