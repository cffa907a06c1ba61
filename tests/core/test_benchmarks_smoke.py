"""The benchmark suite runs end to end at smoke sizes and writes comparable JSON (issue 7).

No timing is asserted: only that every benchmark ran, wrote its parameters, machine info and the named
figures, and that the figures are finite numbers. Two small checks pin down the plumbing the figures rely on:
per-child peak RSS and the end-to-end extrapolation arithmetic.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import run_child
from benchmarks.end_to_end import extrapolate
from benchmarks.profiles import ORDER

REPO = Path(__file__).resolve().parents[2]

NAMED_FIGURES = {
    "jvp_cost": ["jvp_over_kblock_forward", "jvp_over_full_forward"],
    "end_to_end": ["speedup_vs_exact", "spearman_vs_exact"],
    "landmark_sweep": ["spearman_vs_exact_by_L", "seconds_by_L"],
    "scaling": ["peak_rss_ratio_largest_over_smallest", "per_sample_time_ratio_largest_over_smallest"],
    "propagation": ["krr_total_s", "peak_rss_gib"],
    "gpu": ["jvp_over_kblock_forward", "speedup_vs_exact", "spearman_vs_exact"],
}


def _numbers(value, path=""):
    """Every int/float inside a figures structure, with its path (bools and None are not figures)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield path, float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench_results")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--profile", "smoke", "--results-dir", str(out)],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_smoke_suite_writes_every_benchmark_with_finite_named_figures(smoke_results):
    suite = json.loads((smoke_results / "suite.json").read_text())
    assert list(suite["benchmarks"]) == ORDER
    for name in ORDER:
        record = json.loads((smoke_results / f"{name}.json").read_text())
        assert record["name"] == name and record["profile"] == "smoke"
        assert record["params"] and record["machine"]["cpu_count"] >= 1
        for figure in NAMED_FIGURES[name]:
            assert figure in record["figures"], f"{name}.json lacks figure {figure}"
        numbers = list(_numbers(record["figures"]))
        assert numbers, f"{name}.json has no numeric figures"
        bad = [p for p, v in numbers if not math.isfinite(v)]
        assert not bad, f"{name}.json has non-finite figures {bad}"


def test_smoke_spearman_is_a_correlation_and_speedup_positive(smoke_results):
    e2e = json.loads((smoke_results / "end_to_end.json").read_text())["figures"]
    assert -1.0 <= e2e["spearman_vs_exact"] <= 1.0
    assert e2e["speedup_vs_exact"] > 0
    jvp = json.loads((smoke_results / "jvp_cost.json").read_text())["figures"]
    assert set(jvp["jvp_over_kblock_forward"]) == {"16", "32"}
    assert all(v > 0 for v in jvp["jvp_over_kblock_forward"].values())


def test_child_peak_rss_belongs_to_that_child_only():
    # 2 GiB, well above the child's ~1 GiB transient peak while importing torch, so the held block sets the peak
    big = run_child("common", "hold_memory", {"mib": 2048})
    small = run_child("common", "hold_memory", {"mib": 1})
    assert big["held_mib"] == 2048
    # A RUSAGE_CHILDREN-style maximum would report the 2 GiB peak for the second child as well.
    assert big["peak_rss_gib"] - small["peak_rss_gib"] > 0.5


def test_extrapolation_scales_pool_stages_and_keeps_landmark_costs():
    child = {
        "pool_n": 100,
        "exact_s_per_sample_median": 2.0,
        "stage_seconds": {
            "embeddings": 10.0,
            "landmark_gradients": 50.0,
            "target_gradients": 5.0,
            "propagation": 1.0,
            "selection": 0.5,
        },
    }
    out = extrapolate(child, 1000)
    # ID: 10x the pool-sized stages, landmark and target gradients unchanged.
    assert out["id_total_s"] == pytest.approx(100.0 + 50.0 + 5.0 + 10.0 + 5.0)
    # Exact: a gradient for every one of the 1000 samples, the targets, and the same selection.
    assert out["exact_total_s"] == pytest.approx(2000.0 + 5.0 + 5.0)


def test_second_order_memory_smoke_writes_peak_rss_and_seconds_per_landmark(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--profile", "smoke", "--only", "second_order_memory",
         "--results-dir", str(tmp_path)],
        check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "second_order_memory.json").read_text())
    figures = record["figures"]
    assert record["params"]["num_landmarks"] == 4 and record["machine"]["cpu_count"] >= 1
    assert 0 < figures["second_order_peak_rss_gib_l4"] < 8
    assert figures["seconds_per_landmark_l4"] > 0
    # one progress line per landmark
    assert proc.stderr.count("[second_order_memory] landmark") == 4
    assert not (tmp_path / "scale.json").exists()  # only L = 512 touches scale.json


def test_second_order_memory_l512_merges_into_scale_json_keeping_other_figures(tmp_path):
    from benchmarks.second_order_memory import merge_into_scale

    (tmp_path / "scale.json").write_text(json.dumps({"benchmark": "scale", "figures": {"peak_rss_gib_1m": 3.2}}))
    merge_into_scale(tmp_path, {"second_order_peak_rss_gib_l512": 5.5}, {"cpu": "AMD EPYC"})
    figures = json.loads((tmp_path / "scale.json").read_text())["figures"]
    assert figures == {"peak_rss_gib_1m": 3.2, "second_order_peak_rss_gib_l512": 5.5, "second_order_cpu": "AMD EPYC"}


def test_a_scale_rerun_replaces_its_own_figures_and_keeps_the_merged_ones(tmp_path, monkeypatch):
    from benchmarks import scale

    merged = {"second_order_peak_rss_gib_l512": 3.3, "spearman_vs_exact_10k": 0.7}
    old = {"peak_rss_gib_1m": 9.9, "new_target_seconds_1m": 99.0, **merged}
    (tmp_path / "scale.json").write_text(json.dumps({"benchmark": "scale", "figures": old}))
    build = {"coefficients_seconds": 1.0, "read_10k_ids_seconds_cold": 0.1}
    per_size = {"100000": {"build": build, "target": {"peak_rss_gib": 1.5, "new_target_seconds": [2.0, 3.0]}}}
    monkeypatch.setattr(scale, "measure", lambda *args: per_size)
    params = {"sizes": [100_000], "num_landmarks": 8, "targets": 2}
    assert scale.run(params, tmp_path, tmp_path, "cli", {"cpu": "x"}) == {"peak_rss_gib_100k": 1.5}
    figures = json.loads((tmp_path / "scale.json").read_text())["figures"]
    assert figures == {"peak_rss_gib_100k": 1.5, **merged}  # the old 1M figures belong to the older run: gone


def test_hessian_targets_benchmark_compares_each_sampled_hessian_with_all_dev_samples(tmp_path):
    from benchmarks.studies.hessian_targets import compare

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.studies.hessian_targets", "--smoke", "--work-dir", str(tmp_path),
         "--results-dir", str(tmp_path / "results")],
        check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "results" / "hessian_targets.json").read_text())
    rows = record["rows"]
    assert [(r["hessian_targets"], r["seed"]) for r in rows] == [("all", 0), (2, 0), (2, 1)]
    assert record["figures"]["dev_samples"] > 2 and all(r["peak_rss_gib"] > 0 for r in rows)
    for row in rows[1:]:
        assert row["q_relative_distance"] > 0  # 2 of the dev samples: not the whole set's Hessian
        assert all(0 <= v <= 1 for v in [*row["overlap"].values(), *row["first_order_overlap"].values()])
    # against itself: no distance, the same support at every η
    terms = {"p": [0.3, -0.1, 0.2, 0.05], "q": [[1.0, 0.2, 0.0, 0.1], [0.2, 1.0, 0.3, 0.0],
                                               [0.0, 0.3, 1.0, 0.2], [0.1, 0.0, 0.2, 1.0]]}
    same = compare(terms, terms, [1e-3, 10.0], 2)
    assert same["q_relative_distance"] == 0 and set(same["overlap"].values()) == {1.0}
    assert same["first_order_overlap"]["0.001"] == 1.0  # a tiny step: the QP keeps the top-k of p
    assert same["first_order_overlap"]["10"] < 1 and same["overlap_where_q_matters"] == 1.0  # Q decides at η = 10


def test_scale_figures_read_the_target_record_after_the_read_ratios_and_merge_sizes(tmp_path):
    """A 1M record with read ratios (the pipeline-table run) gives every 1M figure, and a second run's sizes and
    figures are merged into scale.json beside the first's."""
    from benchmarks.scale import write_scale

    reads = {"read_100_random": {"as_committed_over_optimized": 51.0}}
    build = {"reads": reads, "optimize_seconds": 18.5, "layout_as_committed": {"fragments": 3907},
             "coefficients_seconds": 213.3, "read_10k_ids_seconds_cold": 0.17}
    record = {"build": build, "target": {"peak_rss_gib": 2.27, "new_target_seconds": [6.9, 5.7]}}
    (tmp_path / "scale.json").write_text(json.dumps({"sizes": {"100000": {"old": 1}}, "figures": {"other": 1.0}}))
    figures = write_scale({"1000000": record}, {}, tmp_path, "cli", {})
    assert figures["new_target_seconds_1m"] == 6.9 and figures["read_100_random_as_committed_over_optimized_1m"] == 51.0
    assert figures["fragments_as_committed_1m"] == 3907 and figures["peak_rss_gib_1m"] == 2.27
    merged = json.loads((tmp_path / "scale.json").read_text())
    assert set(merged["sizes"]) == {"100000", "1000000"} and merged["figures"]["other"] == 1.0
