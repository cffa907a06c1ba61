"""Landmark choice strategies, exact values for landmarks, caps and mixes in round-robin (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest

from idistill_core.errors import ConfigError
from idistill_core.methods.id import landmark_outcome
from idistill_core.pipeline.landmarks import choose_landmarks
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.steps import landmarks
from idistill_core.steps.landmarks import LandmarkConfig
from idistill_core.steps.select import mix_budgets, round_robin, select_mix
from idistill_core.store.lance import EmbeddingStore, StoreIdentity

IDS = [f"s-{i:03d}" for i in range(60)]


def _legacy_choice(sample_ids, num_landmarks, num_holdout, seed):
    """The pipeline's choice before strategies existed (copied from the paper-default implementation)."""
    ordered = sorted(sample_ids)
    picks = np.random.default_rng(seed).choice(len(ordered), size=num_landmarks + num_holdout, replace=False)
    chosen = [ordered[i] for i in picks]
    return chosen[:num_landmarks], chosen[num_landmarks:]


def _emb(n=60, d=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def test_random_strategy_draws_the_same_ids_as_before_for_the_same_seed():
    shuffled = list(reversed(IDS))
    for seed in (0, 7):
        assert choose_landmarks(shuffled, 10, 5, seed) == _legacy_choice(IDS, 10, 5, seed)


@pytest.mark.parametrize("strategy", ["kmeanspp", "kcenter", "leverage"])
def test_coverage_strategies_are_deterministic_disjoint_from_holdout_and_seed_dependent(strategy):
    config = LandmarkConfig(strategy=strategy)
    emb = _emb()
    a = choose_landmarks(IDS, 12, 6, 3, config, emb)
    assert a == choose_landmarks(IDS, 12, 6, 3, config, emb)
    lm, ho = a
    assert len(set(lm)) == 12 and not set(lm) & set(ho)
    assert ho == _legacy_choice(IDS, 12, 6, 3)[1]  # held-out samples stay uniform random
    assert choose_landmarks(IDS, 12, 6, 4, config, emb)[0] != lm


def _reference_choice(sample_ids, num_landmarks, num_holdout, seed, strategy, emb):
    """The coverage strategies as they were before issue 24, written out: float64 copies of the embeddings in id
    order without the held-out rows, ‖x‖² recomputed over all rows at every step."""

    def sq(x, y):
        return np.maximum((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T, 0.0)

    ordered = sorted(sample_ids)
    order = sorted(range(len(sample_ids)), key=lambda i: sample_ids[i])
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(ordered), size=num_landmarks + num_holdout, replace=False)
    held = {int(i) for i in picks[num_landmarks:]}
    free = [i for i in range(len(ordered)) if i not in held]
    sub = np.asarray(emb, dtype=np.float64)[order][free]
    chosen = [int(rng.integers(len(sub)))]
    nearest = sq(sub, sub[[chosen[0]]])[:, 0]
    nearest[chosen] = 0.0 if strategy == "kmeanspp" else -1.0
    while len(chosen) < num_landmarks:
        if strategy == "kmeanspp":
            pick = int(rng.choice(len(sub), p=nearest / nearest.sum()))
        else:
            pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, sq(sub, sub[[pick]])[:, 0])
        nearest[chosen] = 0.0 if strategy == "kmeanspp" else -1.0
    return [ordered[free[r]] for r in chosen]


@pytest.mark.parametrize("strategy", ["kmeanspp", "kcenter"])
def test_coverage_strategies_in_float32_pick_what_the_float64_reference_picks(strategy):
    rng = np.random.default_rng(3)
    centres = rng.normal(scale=4.0, size=(6, 16))
    emb = (centres[rng.integers(0, 6, 500)] + rng.normal(size=(500, 16))).astype(np.float32)
    ids = [f"q{i:04d}" for i in rng.permutation(500)]  # table order is not id order
    config = LandmarkConfig(strategy=strategy)
    for seed in (0, 1, 2):
        got, _ = choose_landmarks(ids, 25, 10, seed, config, emb)
        assert got == _reference_choice(ids, 25, 10, seed, strategy, emb)


def test_leverage_in_float32_matches_float64_scores_and_picks():
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(700, 12))
    ids = [f"q{i:04d}" for i in range(700)]
    config = LandmarkConfig(strategy="leverage", leverage_columns=200)
    a = landmarks.leverage_scores(emb.astype(np.float32), 1e-2, 200, np.random.default_rng(0), block=128)
    b = landmarks.leverage_scores(emb, 1e-2, 200, np.random.default_rng(0))
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert choose_landmarks(ids, 20, 5, 1, config, emb.astype(np.float32)) == choose_landmarks(ids, 20, 5, 1, config, emb)


@pytest.mark.parametrize("strategy", ["kmeanspp", "kcenter", "leverage"])
def test_coverage_strategies_never_copy_the_embeddings_and_compute_norms_once(strategy, monkeypatch):
    import tracemalloc

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40_000, 256)).astype(np.float32)  # 39 MiB
    ids = [f"r{i:06d}" for i in range(len(emb))]
    calls = []
    real = landmarks._squared_norms
    monkeypatch.setattr(landmarks, "_squared_norms", lambda x, *a, **k: calls.append(len(x)) or real(x, *a, **k))
    config = LandmarkConfig(strategy=strategy, leverage_columns=50)
    tracemalloc.start()
    try:
        choose_landmarks(ids, 12, 4, 0, config, emb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # before: three float64 copies (6x the float32 bytes); now the working memory is O(N) vectors and one block
    # (leverage: plus its bandwidth's 1000 x 1000 float64 distances, ~40 MiB whatever N)
    allowance = 48 * 2**20 if strategy == "leverage" else 0
    assert peak < 0.5 * emb.nbytes + allowance, peak / emb.nbytes
    # ‖x‖² of each row once, not once per landmark (leverage: once per row in each of its two passes, + centres)
    assert sum(calls) <= (2 * len(emb) + 50 if strategy == "leverage" else len(emb))


def test_float32_distances_are_zero_for_duplicates_and_resolve_a_one_percent_neighbour():
    rng = np.random.default_rng(7)
    base = rng.normal(size=256).astype(np.float32) * 3
    near = base + (0.01 * np.linalg.norm(base) / 16) * rng.normal(size=256).astype(np.float32)  # ~1% away
    emb = np.vstack([np.tile(base, (20, 1)), near, -base]).astype(np.float32)
    d = landmarks._Distances(emb).to(0)
    # the expansion ‖x‖² + ‖y‖² − 2x·y leaves float32 rounding for an exact duplicate: it must read 0 (no D² mass)
    assert (d[:20] == 0).all()
    copies = np.repeat(rng.normal(size=(200, 256)).astype(np.float32) * 3, 2, axis=0)  # rows 2i and 2i+1 equal
    dist = landmarks._Distances(copies)
    assert all(dist.to(2 * i)[2 * i + 1] == 0 for i in range(200))
    exact = float(((near.astype(np.float64) - base) ** 2).sum())
    assert d[20] == pytest.approx(exact, rel=1e-2) and d[21] == pytest.approx(4 * float((base.astype(np.float64) ** 2).sum()), rel=1e-5)


def test_kcenter_takes_the_farthest_point_each_step():
    # points on a line; after any start, farthest-point must reach both ends before anything in the middle
    emb = np.array([[0.0], [1.0], [2.0], [10.0], [20.0]])
    ids = ["a", "b", "c", "d", "e"]
    lm, _ = choose_landmarks(ids, 3, 0, 0, LandmarkConfig(strategy="kcenter"), emb)
    first = lm[0]
    x = {i: float(v[0]) for i, v in zip(ids, emb, strict=True)}
    # independent greedy: next = argmax of the distance to the nearest chosen point
    chosen = [first]
    while len(chosen) < 3:
        rest = [i for i in ids if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(abs(x[i] - x[c]) for c in chosen), -ids.index(i))))
    assert lm == chosen


def test_leverage_favours_an_isolated_sample():
    # one far-away point is unexplainable by the others: its ridge leverage is the largest
    emb = np.vstack([np.random.default_rng(0).normal(scale=0.1, size=(40, 2)), [[8.0, 8.0]]])
    scores = landmarks.leverage_scores(emb, 1e-3, 1000, np.random.default_rng(0))
    assert int(np.argmax(scores)) == 40


def test_adaptive_first_round_is_random_and_second_round_hugs_the_top_k_cut():
    config = LandmarkConfig(strategy="adaptive", first_round=0.5)
    first, ho = choose_landmarks(IDS, 10, 5, 1, config)
    assert (first, ho) == (_legacy_choice(IDS, 10, 5, 1)[0][:5], _legacy_choice(IDS, 10, 5, 1)[1])
    estimate = np.arange(len(IDS), dtype=float)  # s-059 highest
    more = landmarks.boundary_picks(IDS, estimate, budget=20, count=4, exclude=first + ho)
    assert more == landmarks.boundary_picks(IDS, estimate, budget=20, count=4, exclude=first + ho)
    # the cut lies between ranks 20 and 21, i.e. between values 40 and 39: the 4 nearest allowed samples
    cut = 39.5
    allowed = [i for i in range(60) if IDS[i] not in set(first + ho)]
    expected = sorted(allowed, key=lambda i: (abs(i - cut), IDS[i]))[:4]
    assert more == [IDS[i] for i in expected]


def test_unknown_strategy_and_missing_embeddings_are_refused():
    with pytest.raises(ConfigError, match="strategy"):
        LandmarkConfig(strategy="nope")
    with pytest.raises(ConfigError, match="embeddings"):
        choose_landmarks(IDS, 5, 0, 0, LandmarkConfig(strategy="kcenter"))


def test_less_is_its_own_method_not_exact_under_another_name():
    from idistill_core.methods.less import LessConfig

    recipe = SelectionRecipe(method="less")
    assert recipe.method == "less" and recipe.less == LessConfig()
    with pytest.raises(ConfigError, match="method"):
        SelectionRecipe(method="lesss")


def test_landmarks_and_holdout_keep_their_exact_scores_in_the_final_ranking(tmp_path):
    emb = _emb(30, 3).astype(np.float32)
    ids = IDS[:30]
    store = EmbeddingStore.open(tmp_path, "emb", StoreIdentity(model_fingerprint="m", recipe="r", dim=3))
    store.insert_missing(ids, emb)
    lm_ids, ho_ids = ids[:8], ids[8:12]
    rng = np.random.default_rng(0)
    lm_vals, ho_vals = rng.normal(size=(8, 1)), rng.normal(size=(4, 1))
    from idistill_core.pipeline.propagation import shared_coefficients

    coefficients, _ = shared_coefficients(store, ids, lm_ids, SelectionRecipe().propagate)
    outcome, _, _ = landmark_outcome(coefficients, lm_ids, lm_vals, ho_ids, ho_vals, 5, SelectionRecipe())
    score = dict(zip(outcome.sample_ids, outcome.scores, strict=True))
    exact = dict(zip(lm_ids + ho_ids, np.concatenate([lm_vals, ho_vals])[:, 0], strict=True))
    tol = 8 * np.finfo(np.float32).eps * max(1.0, max(abs(v) for v in exact.values()))
    for sample_id, value in exact.items():
        assert abs(score[sample_id] - value) <= tol
    # the ridge does not interpolate: the propagated landmark values differ from the exact ones
    from idistill_core.pipeline.propagation import propagate_scores

    pids, propagated, _ = propagate_scores(store, ids, lm_ids, lm_vals, SelectionRecipe().propagate)
    prop = dict(zip(pids, propagated[:, 0], strict=True))
    assert max(abs(prop[s] - exact[s]) for s in lm_ids) > 100 * tol


def test_round_robin_honours_per_source_caps():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(60, 3))
    scores[:20] += 10  # source "a" would win everything uncapped
    sources = ["a"] * 20 + ["b"] * 20 + ["c"] * 20
    for fixed in (False, True):
        out = round_robin(IDS, scores, 15, 0, fixed_order=fixed, sources=sources, per_source_cap=5)
        picked = [sources[IDS.index(s)] for s in out.sample_ids]
        assert len(out) == 15 and max(picked.count(x) for x in "abc") <= 5
    with pytest.raises(ConfigError, match="eligible"):
        round_robin(IDS, scores, 16, 0, sources=sources, per_source_cap=5)


def test_round_robin_fixed_order_visits_targets_in_column_order():
    scores = np.random.default_rng(1).normal(size=(60, 4))
    out = round_robin(IDS, scores, 12, 123, fixed_order=True)
    assert out.targets.tolist() == [0, 1, 2, 3] * 3


def test_multi_target_mix_gives_each_target_its_budget():
    assert mix_budgets(10, [1, 1, 1]) == [4, 3, 3]
    assert mix_budgets(10, [3, 1]) == [8, 2]
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=60), rng.normal(size=60)
    out = select_mix(IDS, [a, b], 10, weights=[3, 1])
    assert out.targets.tolist().count(0) == 8 and out.targets.tolist().count(1) == 2
    # target b's picks are its own best samples not already taken by a
    taken_by_a = {s for s, t in zip(out.sample_ids, out.targets, strict=True) if t == 0}
    b_order = [IDS[i] for i in np.argsort(-b, kind="stable") if IDS[i] not in taken_by_a]
    b_picks = [s for s, t in zip(out.sample_ids, out.targets, strict=True) if t == 1]
    assert set(b_picks) <= set(b_order[:4])


def test_cli_multi_target_mix_with_caps_and_adaptive_landmarks(tmp_path, capsys):
    import pyarrow.parquet as pq

    from idistill_core.cli import main

    data = tmp_path / "data"
    assert main(["data", "builtin", "--out", str(data), "--pool-size", "40"]) == 0
    out = tmp_path / "mix.parquet"
    code = main([
        "select", "--pool", str(data / "pool.jsonl"),
        "--target", str(data / "targets/arith/dev.jsonl"), "--target", str(data / "targets/mcq/dev.jsonl"),
        "--target-weights", "3,1", "--per-source-cap", "4", "--landmark-strategy", "adaptive",
        "--model", "tiny-llama", "--budget", "12", "--landmarks", "8", "--profile", "profiles/tiny.yaml",
        "--out", str(out),
    ])
    assert code == 0
    table = pq.read_table(out).to_pydict()
    chosen = [src for src, picked in zip(table["source"], table["selected"], strict=True) if picked]
    assert len(chosen) == 12 and max(chosen.count(s) for s in set(chosen)) <= 4
    assert "per-target budgets [9, 3]" in capsys.readouterr().out
