"""Run the benchmark suite: ``python -m benchmarks.run [--profile full|smoke] [--only NAME ...]``.

Each benchmark prints its table and writes ``<results-dir>/<name>.json``; the run writes ``suite.json``
(profile, per-benchmark status and seconds). A failing benchmark is recorded and the others still run; the
exit status is non-zero when any failed. Benchmarks 2 and 3 share a work dir (embeddings, gradient cache),
a fresh temporary folder unless ``--work-dir`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import RESULTS_DIR, git_commit, machine_info, utc_now, write_json_atomic
from benchmarks.profiles import EXTRA, ORDER, PROFILES


def run_suite(profile: str, only: list[str] | None, results_dir: Path, work_dir: Path | None = None) -> dict:
    """Run the selected benchmarks of ``profile``; returns the suite record (also written to suite.json)."""
    if profile not in PROFILES:
        raise SystemExit(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    unknown = [name for name in only or [] if name not in ORDER + EXTRA]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(ORDER + EXTRA)}")
    names = [name for name in ORDER + EXTRA if (not only and name in ORDER) or (only and name in only)]
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="idistill-bench-work-")) if own_work else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    suite = {
        "profile": profile,
        "started_utc": utc_now(),
        "git_commit": git_commit(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "benchmarks": {},
    }
    start = time.perf_counter()
    try:
        for name in names:
            print(f"\n=== benchmark {name} ({profile}) ===", flush=True)
            began = time.perf_counter()
            module = importlib.import_module(f"benchmarks.{name}")
            try:
                figures = module.run(PROFILES[profile][name], results_dir, work, profile, machine_info())
                status = {"status": "ok", "figures": figures}
            except Exception as error:  # noqa: BLE001 - one failing benchmark must not cost the others
                traceback.print_exc()
                status = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
            status["seconds"] = round(time.perf_counter() - began, 1)
            suite["benchmarks"][name] = status
            print(f"=== {name}: {status['status']} in {status['seconds']:.0f} s ===", flush=True)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    suite["seconds"] = round(time.perf_counter() - start, 1)
    suite["finished_utc"] = utc_now()
    write_json_atomic(results_dir / "suite.json", suite)
    print(
        f"\nsuite ({profile}) finished in {suite['seconds']:.0f} s: "
        + ", ".join(f"{n} {s['status']}" for n, s in suite["benchmarks"].items())
    )
    return suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="idistill benchmark suite")
    parser.add_argument("--profile", default="full", choices=sorted(PROFILES))
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="NAME", help=f"any of: {', '.join(ORDER + EXTRA)}"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep embeddings/gradient caches here")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for every measurement (default: torch's own)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        # Children inherit the environment; torch reads it at import, which happens in the children.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    suite = run_suite(args.profile, args.only, args.results_dir, args.work_dir)
    return 0 if all(s["status"] == "ok" for s in suite["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
