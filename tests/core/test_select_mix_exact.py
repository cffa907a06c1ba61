"""Multi-target budgets and mixes, and weights → subset, against hand computations (issue 25, mutmut survivors of
``steps/select.py``): largest-remainder budgets where the largest remainder is neither the first nor the
largest share, the weight checks one by one, mixes in the given target order with caps, column inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from idistill_core.errors import ConfigError, DataError
from idistill_core.steps.select import mix_budgets, select_from_weights, select_mix

IDS = [f"s{i:02d}" for i in range(12)]


def _largest_remainder(k, weights):
    """Hamilton's method, written out: floors of k·w/Σw, then +1 to the largest remainders (ties: earlier)."""
    total = sum(weights)
    shares = [k * w / total for w in weights]
    base = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(shares[i] - base[i]), i))
    for i in by_remainder[: k - sum(base)]:
        base[i] += 1
    return base


@pytest.mark.parametrize(
    ("k", "weights", "expected"),
    [
        (10, [1, 5, 2], [1, 6, 3]),  # remainders .25 .25 .5: the last target, not the largest share, gets the +1
        (10, [1, 2], [3, 7]),  # 3.33 / 6.67: the +1 goes to the larger remainder, not the first target
        (7, [0.25, 0.125, 0.125], [3, 2, 2]),  # weights below 1 summing to 0.5; remainders .75 .75 beat .5
        (4, [0, 1], [0, 4]),  # a zero weight is allowed and gets nothing
        (5, [2.0], [5]),  # one target takes the whole budget
    ],
)
def test_mix_budgets_are_the_largest_remainder_apportionment(k, weights, expected):
    assert _largest_remainder(k, weights) == expected
    assert mix_budgets(k, weights) == expected


@pytest.mark.parametrize(
    "weights", [[-1.0, 3.0], [math.inf, 1.0], [math.nan, 1.0], [0.0, 0.0], [], [[1.0, 2.0]]]
)
def test_mix_budgets_refuse_each_kind_of_bad_weights(weights):
    with pytest.raises(ConfigError, match="target weights must be non-negative, finite and not all zero"):
        mix_budgets(10, weights)


def test_select_mix_visits_targets_in_the_given_order_with_equal_default_weights():
    rng = np.random.default_rng(0)
    scores = [rng.normal(size=12) for _ in range(3)]
    out = select_mix(IDS, scores, 6)
    assert out.method == "mix"
    assert out.targets.tolist() == [0, 1, 2, 0, 1, 2]  # round-robin in column order, 2 picks each
    # hand loop: each target in turn takes its best sample not yet taken
    taken: list[str] = []
    for t in [0, 1, 2, 0, 1, 2]:
        best = max((s for s in IDS if s not in taken), key=lambda s: scores[t][IDS.index(s)])
        taken.append(best)
    assert out.sample_ids == taken
    np.testing.assert_array_equal(out.scores, [scores[t][IDS.index(s)] for t, s in zip(out.targets, taken, strict=True)])
    # (N, 1) columns are the same scores
    assert select_mix(IDS, [s[:, None] for s in scores], 6).sample_ids == taken


def test_select_mix_honours_the_per_source_cap():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=12), rng.normal(size=12)
    a[:6] += 10  # target a would take all of source "x" uncapped
    b[:6] += 10
    sources = ["x"] * 6 + ["y"] * 6
    out = select_mix(IDS, [a, b], 8, weights=[1, 1], sources=sources, per_source_cap=4)
    picked = [sources[IDS.index(s)] for s in out.sample_ids]
    assert picked.count("x") == 4 and picked.count("y") == 4


def test_select_from_weights_keeps_fractional_weights_and_reports_them():
    ids = ["a", "b", "c", "d"]
    w = np.array([0.25, 0.0, 0.5, 0.25])  # every weight below 1: all non-zero ones count
    sel = select_from_weights(ids, w, 3)
    assert sel.sample_ids == ["c", "a", "d"]
    np.testing.assert_array_equal(sel.scores, [0.5, 0.25, 0.25])
    # a (N, 1) column (the QP's shape) is the same weights
    col = select_from_weights(ids, w[:, None], 3)
    assert col.sample_ids == sel.sample_ids
    np.testing.assert_array_equal(col.scores, sel.scores)
    with pytest.raises(DataError, match="weights is not finite for sample 'b'"):
        select_from_weights(ids, np.array([0.5, np.nan, 0.5, 0.5]), 2)
