"""Landmark strategies against independent computations (issue 25): k-means++'s D² law measured over seeds,
ridge-leverage scores against the exact ``diag(K (K + λnI)⁻¹)`` in numpy, leverage sampling in proportion to
them, and the adaptive strategy's second round through ``methods.id.landmark_set`` against a numpy KRR and a
hand-written boundary rule."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from idistill_core.errors import ConfigError, DataError
from idistill_core.steps import landmarks
from idistill_core.steps.landmarks import LandmarkConfig


def _d2(x: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


# -- k-means++ ---------------------------------------------------------------------------------------------------
def _kmeanspp_via_choose(x, count, rng_seed):
    ids = [f"p{i}" for i in range(len(x))]
    picked, _ = landmarks.choose(ids, count, 0, rng_seed, LandmarkConfig(strategy="kmeanspp"), x)
    return [ids.index(s) for s in picked]


@pytest.mark.parametrize(
    ("scale", "route"), [(1.0, "kmeanspp"), (0.01, "kmeanspp"), (1.0, "choose")]
)
def test_kmeanspp_second_pick_follows_the_squared_distance_law_over_seeds(scale, route):
    # 1-D points; given the first (uniform) pick f, the second must be j with probability d(j, f)² / Σ d(·, f)²,
    # at any scale (a total D² below 1 is no reason to fall back to uniform) and through the strategy's entry
    x = scale * np.array([[0.0], [1.0], [2.0], [4.0], [7.0]])
    d2 = _d2(x)
    draws = 4000
    seconds: dict[int, Counter] = {i: Counter() for i in range(len(x))}
    for seed in range(draws):
        if route == "kmeanspp":
            first, second = landmarks.kmeanspp(x, 2, np.random.default_rng(seed))
        else:
            first, second = _kmeanspp_via_choose(x, 2, seed)
        seconds[first][second] += 1
    for first, counts in seconds.items():
        total = sum(counts.values())
        assert total > draws / len(x) * 0.8  # the first pick is uniform
        expected = d2[first] / d2[first].sum()
        got = np.array([counts[j] / total for j in range(len(x))])
        assert got[first] == 0.0
        # ~800 draws per first pick: a binomial standard deviation of at most 0.018; uniform would be 0.25 each
        np.testing.assert_allclose(got, expected, atol=0.06)
    # the law is D², not D: from 0 the far point 7 takes 49/70 of the mass (with D it would take 7/14)
    p7 = seconds[0][4] / sum(seconds[0].values())
    assert abs(p7 - 49 / 70) < 0.06 and abs(p7 - 7 / 14) > 0.1


def test_kmeanspp_never_repeats_a_location_while_an_uncovered_one_remains():
    # 30 copies of the origin and two far points: D² gives duplicates of a chosen point zero mass, so three
    # picks always cover all three locations (uniform picks would hit the origin copies 30 times in 32)
    x = np.vstack([np.zeros((30, 2)), [[10.0, 0.0], [0.0, 10.0]]])
    for seed in range(40):
        rows = landmarks.kmeanspp(x, 3, np.random.default_rng(seed))
        assert len(set(rows)) == 3
        assert {tuple(x[r]) for r in rows} == {(0.0, 0.0), (10.0, 0.0), (0.0, 10.0)}, (seed, rows)
    # duplicates only: the fallback draws distinct rows
    rows = landmarks.kmeanspp(np.zeros((6, 2)), 4, np.random.default_rng(0))
    assert len(set(rows)) == 4


def test_kcenter_never_repeats_a_point_when_every_distance_is_below_one():
    # chosen points are marked below any distance, so even a tiny cloud gets distinct farthest points
    x = 0.01 * np.array([[0.0], [1.0], [2.0], [5.0], [9.0]])
    rows = landmarks.kcenter(x, 4, np.random.default_rng(0))
    chosen = rows[:1]
    while len(chosen) < 4:  # independent greedy on the 1-D coordinates
        rest = [i for i in range(5) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(abs(x[i, 0] - x[c, 0]) for c in chosen), -i)))
    assert rows == chosen and len(set(rows)) == 4


# -- choose: budgets, held-out, shapes -----------------------------------------------------------------------------
def test_choose_allows_every_sample_as_a_landmark_and_clips_the_holdout():
    ids = [f"p{i}" for i in range(10)]
    emb = np.random.default_rng(0).normal(size=(10, 2))
    for config in (LandmarkConfig(), LandmarkConfig(strategy="kcenter")):
        lm, ho = landmarks.choose(ids, 10, 3, 0, config, emb)  # L = N: no room for held-out samples
        assert sorted(lm) == ids and ho == []
        lm, ho = landmarks.choose(ids, 8, 5, 0, config, emb)  # only N - L = 2 held out
        assert len(lm) == 8 and len(ho) == 2 and not set(lm) & set(ho)
    with pytest.raises(ConfigError, match="num_landmarks=11 exceeds the pool size N=10"):
        landmarks.choose(ids, 11, 0, 0)
    with pytest.raises(DataError, match=r"embeddings must be \(N=10, D\); got shape \(9, 2\)"):
        landmarks.choose(ids, 3, 0, 0, LandmarkConfig(strategy="kcenter"), emb[:9])
    with pytest.raises(DataError, match="embeddings must be"):
        landmarks.choose(ids, 3, 0, 0, LandmarkConfig(strategy="kcenter"), emb[:, 0])


@pytest.mark.parametrize(("first_round", "num_landmarks", "expected"), [(0.1, 3, 1), (0.5, 8, 4), (1.0, 5, 5)])
def test_adaptive_first_round_is_its_share_of_the_budget_and_at_least_one(first_round, num_landmarks, expected):
    config = LandmarkConfig(strategy="adaptive", first_round=first_round)
    assert config.first_round_size(num_landmarks) == expected
    assert LandmarkConfig(strategy="kcenter", first_round=first_round).first_round_size(num_landmarks) == num_landmarks


# -- leverage ------------------------------------------------------------------------------------------------------
class _RecordingRng:
    """A generator stand-in that records ``choice`` calls and delegates them to a seeded generator."""

    def __init__(self, seed):
        self._rng = np.random.default_rng(seed)
        self.draws = []

    def choice(self, *args, **kwargs):
        out = self._rng.choice(*args, **kwargs)
        self.draws.append(np.asarray(out))
        return out


def test_leverage_bandwidth_is_the_median_over_at_most_1000_distinct_rows():
    x = np.random.default_rng(2).normal(size=(1001, 2))
    rng = _RecordingRng(0)
    sigma = landmarks._median_sigma(x, rng)
    (rows,) = rng.draws  # one draw: a subset, because 1001 > 1000
    assert len(rows) == 1000 and len(set(rows.tolist())) == 1000
    assert sigma == pytest.approx(_median_sigma_mean(x[rows]), rel=1e-12)
    # at 1000 rows no subset is drawn: the median of every pair
    rng = _RecordingRng(0)
    assert landmarks._median_sigma(x[:1000], rng) == pytest.approx(_median_sigma_mean(x[:1000]), rel=1e-12)
    assert rng.draws == []
    # one row has no pair: the bandwidth falls back to 1
    assert landmarks._median_sigma(x[:1], np.random.default_rng(0)) == 1.0


def test_leverage_scores_of_a_pool_over_1000_rows_are_seeded_and_in_range():
    x = np.random.default_rng(3).normal(size=(1001, 2))
    a = landmarks.leverage_scores(x, 1e-2, 40, np.random.default_rng(5))
    b = landmarks.leverage_scores(x, 1e-2, 40, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1001,) and (a > 0).all() and (a < 1 + 1e-9).all()


def _median_sigma_mean(x: np.ndarray) -> float:
    """numpy's median (mean of the two middle values) of the pairwise squared distances, square-rooted: the
    bandwidth ``steps.landmarks`` documents for leverage (not the propagation's lower median)."""
    d2 = _d2(x)
    return float(np.sqrt(np.median(d2[np.triu_indices(len(x), 1)])))


def _exact_leverage(x: np.ndarray, ridge: float) -> np.ndarray:
    """``diag(K (K + λ n I)⁻¹)`` of the RBF kernel with the median bandwidth, by a dense solve."""
    n = len(x)
    k = np.exp(-_d2(x) / (2 * _median_sigma_mean(x) ** 2))
    return np.diag(k @ np.linalg.inv(k + ridge * n * np.eye(n)))


@pytest.mark.parametrize("ridge", [1e-2, 1e-1])
def test_leverage_scores_with_every_column_equal_the_exact_ridge_leverage(ridge):
    # Nyström with all n columns is exact: C W⁺ Cᵀ = K, so the scores are the textbook ridge leverage
    rng = np.random.default_rng(4)
    x = np.vstack([rng.normal(size=(14, 3)), rng.normal(size=(3, 3)) + 4.0])
    got = landmarks.leverage_scores(x, ridge, columns=1000, rng=np.random.default_rng(0))
    expected = _exact_leverage(x, ridge)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    # the scores are not a distance to the centroid: both rankings disagree on this cloud
    centroid = ((x - x.mean(0)) ** 2).sum(1)
    assert not np.array_equal(np.argsort(got), np.argsort(centroid))
    # and they are ridge-leverage: every score in (0, 1), their sum the effective dimension < n
    assert (got > 0).all() and (got < 1).all() and got.sum() < len(x)


def test_leverage_strategy_draws_landmarks_in_proportion_to_the_scores():
    # one landmark per seed from a pool whose scores differ a lot: the frequency of each id follows score / Σ
    rng = np.random.default_rng(1)
    emb = np.vstack([rng.normal(scale=0.3, size=(7, 2)), [[3.0, 3.0], [-3.0, 3.0]]])
    ids = [f"p{i}" for i in range(len(emb))]
    config = LandmarkConfig(strategy="leverage", leverage_ridge=0.05)
    draws = 3000
    counts = Counter(landmarks.choose(ids, 1, 0, seed, config, emb)[0][0] for seed in range(draws))
    scores = _exact_leverage(emb, 0.05)
    expected = scores / scores.sum()
    got = np.array([counts[i] / draws for i in ids])
    np.testing.assert_allclose(got, expected, atol=0.03)
    assert expected.max() > 2 * expected.min()  # the case separates proportional from uniform (1/9 each)
    # and without replacement: 8 landmarks of 9 are 8 distinct samples for every seed
    for seed in range(10):
        lm, _ = landmarks.choose(ids, 8, 0, seed, config, emb)
        assert len(set(lm)) == 8, (seed, lm)


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [("first_round", [1e-9, 1.0], [0.0, 1.01]), ("leverage_ridge", [1e-12], [0.0]), ("leverage_columns", [1], [0])],
)
def test_landmark_config_accepts_its_documented_range_and_refuses_the_edges_outside(field, good, bad):
    for value in good:
        assert getattr(LandmarkConfig(**{field: value}), field) == value
    for value in bad:
        with pytest.raises(ConfigError, match=f"landmarks.{field} must be"):
            LandmarkConfig(**{field: value})


# -- adaptive --------------------------------------------------------------------------------------------------
def test_boundary_picks_at_budget_one_and_budget_n():
    ids = [f"p{i}" for i in range(6)]
    est = np.array([5.0, 1.0, 3.0, 0.0, 4.0, 2.0])
    # k = 1: the cut halves the gap between the best (5) and the second (4): 4.5
    assert landmarks.boundary_picks(ids, est, 1, 3, []) == ["p0", "p4", "p2"]
    # k = N: everything is selected; the cut is the lowest estimate itself (0), so the lowest come first
    assert landmarks.boundary_picks(ids, est, 6, 3, []) == ["p3", "p1", "p5"]
    assert landmarks.boundary_picks(ids, est, 6, 2, ["p3"]) == ["p1", "p5"]
    for bad in (0, 7):
        with pytest.raises(ConfigError, match=f"budget k={bad}"):
            landmarks.boundary_picks(ids, est, bad, 1, [])


def test_boundary_picks_break_the_rank_k_tie_by_id_for_float32_estimates():
    # the pipeline's estimates are float32; in float32, 1 + (1 + 2⁻²³) rounds to 2, which would put the cut on one
    # of the two and decide their tie by rounding; computed in float64 they are equidistant and go by id
    est = np.array([1.0 + 2.0**-23, 1.0, 0.0], dtype=np.float32)
    assert landmarks.boundary_picks(["p0", "p1", "p2"], est, 1, 2, []) == ["p0", "p1"]


# -- adaptive, end to end through landmark_set -----------------------------------------------------------------
def _rbf_krr(train_x, train_y, test_x):
    """The default propagation, written out: RBF with σ = sqrt(lower median of the landmarks' pairwise squared
    distances), relative ridge 0.01 (K has a unit diagonal), dense solve."""
    d2 = _d2(train_x)
    pairs = np.sort(d2[np.triu_indices(len(train_x), 1)])
    sigma = np.sqrt(pairs[(len(pairs) - 1) // 2])
    k = np.exp(-d2 / (2 * sigma**2))
    k_te = np.exp(-((test_x[:, None, :] - train_x[None, :, :]) ** 2).sum(-1) / (2 * sigma**2))
    return k_te @ np.linalg.solve(k + 0.01 * np.eye(len(train_x)), train_y)


def test_adaptive_landmark_set_adds_the_pool_samples_nearest_the_first_rounds_top_k_cut(tiny, data, tmp_path):
    from idistill_core.methods.base import SelectionContext
    from idistill_core.methods.id import landmark_set
    from idistill_core.pipeline.embeddings import embed_pool, open_store
    from idistill_core.pipeline.gradients import compute_gradients
    from idistill_core.pipeline.recipe import resolve_recipe
    from tests.core.test_pipeline import RECIPE

    pool, targets = data
    pool = pool.select(range(40))
    model, tokenizer = tiny.model, tiny.tokenizer
    budget, num_landmarks, num_holdout, seed = 10, 8, 4, 5
    recipe = dataclasses.replace(
        RECIPE, num_landmarks=num_landmarks, num_holdout=num_holdout, seed=seed, center=False,
        landmarks=LandmarkConfig(strategy="adaptive", first_round=0.5),
    )  # uncentred values (the paper's g · mean(t)), whatever the recipe's default
    recipe, _ = resolve_recipe(recipe, model)
    store = open_store(tmp_path, "emb", tiny.fingerprint, recipe, model.config.hidden_size)
    embed_pool(model, tokenizer, pool, store, recipe.embed)
    ctx = SelectionContext(model, tokenizer, tiny.fingerprint, pool, targets, budget, recipe, tmp_path)
    target_grads = compute_gradients(model, tokenizer, targets, None, recipe.gradients).grads

    def gradients(ids):  # how the method gets pool gradients (plain model, no preconditioner)
        return compute_gradients(model, tokenizer, pool, ids, recipe.gradients).grads

    got = landmark_set(ctx, store, target_grads, gradients)

    # independent: round 1 is the legacy uniform draw's first half; its exact values g · mean(t)
    pool_ids = list(pool["sample_id"])
    ordered = sorted(pool_ids)
    picks = np.random.default_rng(seed).choice(len(ordered), size=num_landmarks + num_holdout, replace=False)
    first = [ordered[i] for i in picks[: num_landmarks // 2]]
    holdout = [ordered[i] for i in picks[num_landmarks:]]
    t_mean = target_grads.double().numpy().mean(axis=0)

    def exact(ids):
        """Plain exact gradients (compute_gradients, checked against autograd in test_pipeline) and g · mean(t)."""
        grads = compute_gradients(model, tokenizer, pool, ids, recipe.gradients).grads.double().numpy()
        return {s: (row, float(row @ t_mean)) for s, row in zip(ids, grads, strict=True)}

    known = exact(first + holdout)
    # propagate round 1 over the pool (numpy KRR on the stored embeddings), then the rule of boundary_picks
    emb = dict(zip(pool_ids, store.read(pool_ids).astype(np.float64), strict=True))
    estimate = _rbf_krr(
        np.array([emb[s] for s in first]), np.array([known[s][1] for s in first]), np.array([emb[s] for s in pool_ids])
    )
    ranked = np.sort(estimate)[::-1]
    cut = 0.5 * (ranked[budget - 1] + ranked[budget])
    allowed = [i for i, s in enumerate(pool_ids) if s not in set(first + holdout)]
    distance = {i: abs(estimate[i] - cut) for i in allowed}
    # ranks k and k+1 lie exactly half their gap from the midpoint cut: a tie by definition, broken by id
    half = 0.5 * (ranked[budget - 1] - ranked[budget])
    for i in allowed:
        if estimate[i] in (ranked[budget - 1], ranked[budget]):
            distance[i] = half
    nearest = sorted(allowed, key=lambda i: (distance[i], pool_ids[i]))
    count = num_landmarks - len(first)
    # the case has no near-tie in the order that matters (float32 estimates in the pipeline cannot reorder it)
    gaps = np.diff([distance[i] for i in nearest[: count + 1]])
    assert ((gaps == 0) | (gaps > 1e-4 * max(abs(cut), 1e-3))).all(), (gaps, cut)
    second = [pool_ids[i] for i in nearest[:count]]
    known.update(exact(second))
    g = {s: row for s, (row, _) in known.items()}
    value = {s: v for s, (_, v) in known.items()}

    assert got.ids == first + second
    assert got.holdout_ids == holdout
    np.testing.assert_allclose(got.values[:, 0], [value[s] for s in got.ids], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.holdout_values[:, 0], [value[s] for s in holdout], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.grads.double().numpy(), np.array([g[s] for s in got.ids]), rtol=1e-4, atol=1e-6)
    # the second round is not what a random round would have drawn: it hugs the cut
    assert set(second) != {ordered[i] for i in picks[num_landmarks // 2 : num_landmarks]}
