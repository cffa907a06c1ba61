"""Selectors: top-k with ties and caps, round-robin against the official loop, weights -> subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idistill_core.errors import ConfigError, DataError
from idistill_core.steps.select import round_robin, select_from_weights, select_top_k


def _reference_round_robin(scores: np.ndarray, k: int, seed: int) -> tuple[list[int], list[float]]:
    """The official `_perform_selection_rr` loop: argmax per pick over all N, mask used with -1e8.

    np.argmax returns the first maximum, so with ids in ascending order that is the id tie-break.
    """
    s = scores.copy()
    rng = np.random.default_rng(seed)
    picked, vals = [], []
    while len(picked) < k:
        for t in rng.permutation(s.shape[1]):
            i = int(np.argmax(s[:, t]))
            picked.append(i)
            vals.append(scores[i, t])
            s[i, :] = -1e8
            if len(picked) == k:
                break
    return picked, vals


def test_top_k_orders_by_score_then_id():
    ids = ["d", "b", "a", "c", "e"]
    sel = select_top_k(ids, torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0]), 4)
    assert sel.sample_ids == ["a", "b", "e", "d"]
    np.testing.assert_array_equal(sel.scores, [2.0, 2.0, 2.0, 1.0])
    assert sel.rank == {"a": 0, "b": 1, "e": 2, "d": 3}
    # Order of the input rows does not matter.
    perm = [4, 2, 0, 3, 1]
    again = select_top_k([ids[i] for i in perm], np.array([1.0, 2.0, 2.0, 0.5, 2.0])[perm], 4)
    assert again.sample_ids == sel.sample_ids


def test_top_k_per_source_cap_skips_capped_sources():
    ids = [f"s{i}" for i in range(6)]
    scores = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    sources = ["x", "x", "x", "y", "y", "z"]
    sel = select_top_k(ids, scores, 4, sources=sources, per_source_cap=2)
    assert sel.sample_ids == ["s0", "s1", "s3", "s4"]
    with pytest.raises(ConfigError, match="allows only 5 samples; k=6"):
        select_top_k(ids, scores, 6, sources=sources, per_source_cap=2)


@pytest.mark.parametrize("k", [0, 7, -1])
def test_bad_budget_is_a_config_error(k):
    with pytest.raises(ConfigError, match=r"k must be in \[1, 6\]"):
        select_top_k([f"s{i}" for i in range(6)], np.zeros(6), k)
    with pytest.raises(ConfigError, match=r"k must be in \[1, 6\]"):
        round_robin([f"s{i}" for i in range(6)], np.zeros((6, 2)), k, seed=0)


def test_nan_score_names_the_sample():
    with pytest.raises(DataError, match="'s2'"):
        select_top_k(["s0", "s1", "s2"], np.array([0.0, 1.0, np.nan]), 1)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_round_robin_matches_the_official_loop(seed):
    rng = np.random.default_rng(100 + seed)
    n, t, k = 200, 5, 60
    scores = rng.normal(size=(n, t)).round(1)  # rounding creates ties
    ids = [f"id{i:04d}" for i in range(n)]
    sel = round_robin(ids, scores, k, seed)
    ref, vals = _reference_round_robin(scores, k, seed)
    assert sel.sample_ids == [ids[i] for i in ref]
    np.testing.assert_array_equal(sel.scores, vals)
    assert len(set(sel.sample_ids)) == k


def test_round_robin_gives_every_target_one_pick_per_round():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 4))
    sel = round_robin([str(i) for i in range(50)], scores, 12, seed=3)
    for r in range(3):
        assert sorted(sel.targets[4 * r : 4 * r + 4].tolist()) == [0, 1, 2, 3]
    assert round_robin([str(i) for i in range(50)], scores, 12, seed=3).sample_ids == sel.sample_ids
    # Every target prefers the same sample: it is taken once, the next target gets its second best.
    same = np.tile(np.arange(10.0)[:, None], (1, 3))
    sel2 = round_robin([f"s{i}" for i in range(10)], same, 3, seed=0)
    assert sel2.sample_ids == ["s9", "s8", "s7"]


def test_round_robin_with_k_equal_n_selects_everything():
    scores = np.random.default_rng(1).normal(size=(9, 2))
    sel = round_robin([str(i) for i in range(9)], scores, 9, seed=0)
    assert sorted(sel.sample_ids) == sorted(str(i) for i in range(9))


def test_select_from_weights_takes_nonzero_by_weight():
    ids = ["a", "b", "c", "d", "e"]
    w = torch.tensor([0.0, 1.5, 0.0, 2.5, 1.5], dtype=torch.float64)
    sel = select_from_weights(ids, w, 3)
    assert sel.sample_ids == ["d", "b", "e"] and sel.method == "weights"
    assert select_from_weights(ids, w, 2).sample_ids == ["d", "b"]
    with pytest.raises(DataError, match="only 3 non-zero"):
        select_from_weights(ids, w, 4)
    with pytest.raises(DataError, match="sample 'c'"):
        select_from_weights(ids, torch.tensor([0.0, 1.0, -0.1, 1.0, 1.0]), 2)
