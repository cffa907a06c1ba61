"""Selector edge cases against hand loops (issue 25, the mutmut survivors of ``steps/select.py`` listed in
docs/mutation-testing.md): one target column, a cap of one per source, the cap and quota checks one by one,
unequal mix quotas where one target runs out first, float32 and column inputs, the method names."""

from __future__ import annotations

import numpy as np
import pytest

from idistill_core.errors import ConfigError, DataError
from idistill_core.steps.select import round_robin, select_from_weights, select_mix, select_top_k

IDS = [f"s{i:02d}" for i in range(10)]


def _by_score_then_id(ids, scores):
    return sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))


@pytest.mark.parametrize("shape", ["1d", "column"])
def test_round_robin_over_one_target_is_the_top_k_by_score_then_id(shape):
    scores = np.array([0.3, 0.9, 0.1, 0.9, 0.5, -0.2, 0.5, 0.0, 0.7, 0.9])  # ties at 0.9 and 0.5
    order = _by_score_then_id(IDS, scores)[:6]
    sel = round_robin(IDS, scores if shape == "1d" else scores[:, None], 6, seed=4)
    assert sel.sample_ids == [IDS[i] for i in order] == ["s01", "s03", "s09", "s08", "s04", "s06"]
    np.testing.assert_array_equal(sel.scores, scores[order])
    assert sel.targets.tolist() == [0] * 6


def test_round_robin_with_no_target_column_is_a_data_error():
    with pytest.raises(DataError, match="scores has no target columns"):
        round_robin(IDS, np.zeros((10, 0)), 3, seed=0)


def test_round_robin_with_a_cap_of_one_takes_each_sources_best_in_turn():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(10, 2))
    sources = ["a", "a", "b", "b", "b", "c", "c", "d", "d", "d"]
    sel = round_robin(IDS, scores, 4, seed=0, fixed_order=True, sources=sources, per_source_cap=1)
    # hand loop: targets 0, 1, 0, 1; each its best sample whose source has not been picked yet
    taken, used_sources = [], set()
    for t in [0, 1, 0, 1]:
        free = [i for i in range(10) if IDS[i] not in taken and sources[i] not in used_sources]
        best = max(free, key=lambda i: scores[i, t])
        taken.append(IDS[best])
        used_sources.add(sources[best])
    assert sel.sample_ids == taken
    assert sorted(sources[IDS.index(s)] for s in sel.sample_ids) == ["a", "b", "c", "d"]
    with pytest.raises(ConfigError, match="round-robin found only 4 eligible samples for k=5"):
        round_robin(IDS, scores, 5, seed=0, sources=sources, per_source_cap=1)


@pytest.mark.parametrize("sources", [None, ["a"] * 9])
def test_round_robin_cap_needs_one_source_per_sample(sources):
    with pytest.raises(ConfigError, match="per_source_cap needs one source per sample_id"):
        round_robin(IDS, np.zeros((10, 2)), 3, seed=0, sources=sources, per_source_cap=2)


@pytest.mark.parametrize("quotas", [[1, 1, 1], [-1, 4], [1, 1]])
def test_round_robin_refuses_quotas_of_the_wrong_length_sign_or_sum(quotas):
    # [1, 1, 1]: three quotas for two columns (sum = k); [-1, 4]: negative (sum = k); [1, 1]: sum != k
    with pytest.raises(ConfigError, match="quotas must be 2 non-negative counts summing to k=3"):
        round_robin(IDS, np.zeros((10, 2)), 3, seed=0, quotas=quotas)


def test_a_zero_quota_column_never_picks_and_a_full_column_passes_its_turn():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=10), rng.normal(size=10)
    zero = round_robin(IDS, np.stack([a, b], axis=1), 3, seed=0, fixed_order=True, quotas=[0, 3])
    assert zero.targets.tolist() == [1, 1, 1]
    assert zero.sample_ids == [IDS[i] for i in _by_score_then_id(IDS, b)[:3]]
    # weights 1:3 -> quotas [1, 3] (k = 4): target 0 is full after the first round, target 1 keeps picking
    mix = select_mix(IDS, [a, b], 4, weights=[1, 3])
    assert mix.targets.tolist() == [0, 1, 1, 1]
    first = IDS[int(np.argmax(a))]
    rest = [IDS[i] for i in _by_score_then_id(IDS, b) if IDS[i] != first][:3]
    assert mix.sample_ids == [first, *rest]


def test_top_k_with_a_cap_of_one_takes_each_sources_best_and_needs_the_sources():
    scores = np.array([0.3, 0.9, 0.1, 0.8, 0.5, -0.2, 0.6, 0.0, 0.7, 0.4])
    sources = ["a", "a", "b", "b", "b", "c", "c", "d", "d", "d"]
    sel = select_top_k(IDS, scores, 4, sources=sources, per_source_cap=1)
    best = {}
    for i in _by_score_then_id(IDS, scores):
        best.setdefault(sources[i], i)
    expected = sorted(best.values(), key=lambda i: -scores[i])
    assert sel.sample_ids == [IDS[i] for i in expected] == ["s01", "s03", "s08", "s06"]
    assert sel.method == "top_k"
    for bad in (None, sources[:9]):
        with pytest.raises(ConfigError, match="per_source_cap needs one source per sample_id"):
            select_top_k(IDS, scores, 4, sources=bad, per_source_cap=1)


def test_selectors_return_float64_scores_of_float32_and_column_inputs_and_name_their_method():
    scores32 = np.array([0.1, 0.7, 0.3, 0.7, 0.2, 0.9, 0.0, 0.4, 0.6, 0.5], dtype=np.float32)
    expected = [IDS[i] for i in _by_score_then_id(IDS, scores32.astype(np.float64))[:4]]
    top = select_top_k(IDS, scores32[:, None], 4)  # an (N, 1) column is the same scores
    assert top.sample_ids == expected and top.scores.dtype == np.float64
    np.testing.assert_array_equal(top.scores, np.sort(scores32.astype(np.float64))[::-1][:4])
    rr = round_robin(IDS, scores32, 4, seed=0)
    assert rr.sample_ids == expected and rr.scores.dtype == np.float64 and rr.method == "round_robin"
    w = select_from_weights(IDS, scores32, 4)
    assert w.sample_ids == expected and w.scores.dtype == np.float64


def test_input_errors_name_the_scores():
    with pytest.raises(DataError, match=r"^scores is not finite for sample 's02'$"):
        select_top_k(IDS, np.array([0.0, 1.0, np.nan] + [0.0] * 7), 1)
    with pytest.raises(DataError, match=r"^scores has 9 rows but there are 10 sample_ids$"):
        round_robin(IDS, np.zeros((9, 2)), 1, seed=0)
