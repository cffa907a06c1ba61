"""The resumable 10k end-to-end benchmark (benchmarks/studies/end_to_end_10k.py) at tiny sizes: a run killed
after a few chunks and started again gives the figures of an uninterrupted run, and recomputes no chunk."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.studies.end_to_end_10k import STAGES, main

# 7 chunks: 1 target, 2 embedding, 2 landmark and 2 held-out gradient chunks
TINY = ["--smoke", "--pool-size", "12", "--landmarks", "4", "--holdout", "4", "--targets", "arith",
        "--target-examples", "2", "--embed-chunk", "6", "--gradient-chunk", "2"]


def _run(work, *extra) -> int:
    return main([*TINY, "--work-dir", str(work), "--results-dir", str(work / "results"), *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    whole = tmp_path_factory.mktemp("whole")
    assert _run(whole) == 0
    resumed = tmp_path_factory.mktemp("resumed")
    (resumed / "results").mkdir()
    (resumed / "results" / "scale.json").write_text(json.dumps({"name": "scale", "figures": {"other": 7}}))
    # stopped twice, three chunks a process: across the target/embedding and the landmark/held-out boundaries
    for limit in (3, 3):
        assert _run(resumed, "--max-chunks", str(limit)) == 3
        assert not (resumed / "results" / "end_to_end_10k.json").exists()  # no figures before completion
    assert _run(resumed) == 0
    load = lambda d, f: json.loads((d / f).read_text())
    return {name: (load(d, "results/end_to_end_10k.json"), load(d, "progress.json"), d)
            for name, d in (("whole", whole), ("resumed", resumed))}


def test_resumed_run_gives_the_same_rank_agreement_and_recomputes_no_chunk(runs):
    (whole, whole_progress, _), (resumed, progress, _) = runs["whole"], runs["resumed"]
    assert progress["sessions"] and len(progress["sessions"]) == 3
    for target, rho in whole["figures"]["spearman_vs_exact_10k_per_target"].items():
        assert resumed["figures"]["spearman_vs_exact_10k_per_target"][target] == pytest.approx(rho, abs=1e-9)
    assert resumed["figures"]["spearman_vs_exact_10k"] == pytest.approx(whole["figures"]["spearman_vs_exact_10k"])
    for stage in STAGES:
        chunks = progress["stages"][stage]["chunks"]
        indices = [c["index"] for c in chunks]
        assert len(indices) == len(set(indices)), f"{stage}: a chunk was computed twice"
        assert sum(c["samples"] for c in chunks) == progress["stages"][stage]["total"]
        assert len(chunks) == len(whole_progress["stages"][stage]["chunks"])
    # the chunks were spread over the three sessions
    assert {c["session"] for s in STAGES for c in progress["stages"][s]["chunks"]} == {0, 1, 2}


def test_figures_follow_from_the_recorded_chunks_and_merge_into_scale(runs):
    record, progress, work = runs["resumed"]
    f = record["figures"]
    stages = progress["stages"]
    secs = {s: sum(c["wall_s"] for c in stages[s]["chunks"]) for s in STAGES}
    rates = [c["wall_s"] / c["samples"] for s in ("landmark_gradients", "holdout_gradients")
             for c in stages[s]["chunks"]]
    selection = stages["propagation_selection"]["chunks"][0]["selection_s"]
    id_total = secs["target_gradients"] + secs["embeddings"] + secs["landmark_gradients"] + secs["propagation_selection"]
    exact_total = 12 * float(np.median(rates)) + secs["target_gradients"] + selection
    assert f["end_to_end_10k_seconds"] == pytest.approx(id_total)
    assert f["exact_10k_seconds"] == pytest.approx(exact_total)
    assert f["speedup_vs_exact_10k"] == pytest.approx(exact_total / id_total)
    assert f["pool_n"] == 12 and f["num_landmarks"] == 4 and f["num_holdout"] == 4
    scale = json.loads((work / "results" / "scale.json").read_text())["figures"]
    assert scale["other"] == 7  # the other figures of scale.json are kept
    for key in ("end_to_end_10k_seconds", "exact_10k_seconds", "speedup_vs_exact_10k", "spearman_vs_exact_10k"):
        assert scale[key] == pytest.approx(f[key])
    assert scale["end_to_end_10k_pool_n"] == 12 and scale["end_to_end_10k_cpu"]


def test_resume_with_other_parameters_is_refused(runs):
    _, _, work = runs["resumed"]
    with pytest.raises(SystemExit, match="other parameters"):
        main([*TINY, "--pool-size", "16", "--work-dir", str(work)])
