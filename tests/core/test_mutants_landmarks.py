"""The mutmut survivors of ``steps/landmarks.py`` (issue 25, listed in docs/mutation-testing.md).

Leverage scores over a subset of rows: ``rows=`` must score exactly the gathered copy ``emb[rows]`` — its
bandwidth, its Nyström columns and its kernel rows all from those rows, none from the excluded ones. Then the
helpers under every coverage strategy: rows of any numeric dtype, norms summed in float64, the bandwidth's
subsample of ``rows``, and a positive floor on every leverage score."""

from __future__ import annotations

import numpy as np
import pytest

from idistill_core.steps import landmarks


@pytest.mark.parametrize("columns", [6, 1000])
def test_leverage_scores_of_rows_equal_the_scores_of_the_gathered_rows(columns):
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(40, 3))
    emb[::2] += 25.0  # the excluded rows lie far away: any use of them moves σ, the columns or the kernel rows
    rows = np.arange(1, 40, 2)[::-1].copy()  # every odd row, in reverse order
    got = landmarks.leverage_scores(emb, 1e-2, columns, np.random.default_rng(9), rows=rows)
    want = landmarks.leverage_scores(emb[rows], 1e-2, columns, np.random.default_rng(9))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert got.shape == (20,) and np.ptp(got) > 1e-3  # not a constant vector


def test_integer_embeddings_choose_what_their_float64_values_choose():
    """Rows that are neither float32 nor float64 are read as float64 (an int or float16 array has no rounding floor
    the distances could use); every coverage strategy then picks exactly what the float64 copy picks."""
    rng = np.random.default_rng(3)
    values = rng.integers(-20, 20, size=(30, 4))
    ids = [f"s{i:02d}" for i in range(30)]
    for strategy in ("kmeanspp", "kcenter", "leverage"):
        config = landmarks.LandmarkConfig(strategy=strategy)
        want = landmarks.choose(ids, 6, 3, 11, config, embeddings=values.astype(np.float64))
        assert landmarks.choose(ids, 6, 3, 11, config, embeddings=values) == want
    assert landmarks._float_rows(values).dtype == np.float64
    float32 = values.astype(np.float32)
    assert landmarks._float_rows(float32) is float32  # the store's float32 is not copied


def test_squared_norms_of_float32_rows_are_summed_in_float64():
    """The norms enter ``‖x‖² + ‖y‖² − 2 x·y``, where a float32 sum's rounding (~1e-7 relative over D terms) would
    swamp the small distances; the float64 sum of the float32 values is exact to ~1e-16 · D."""
    rng = np.random.default_rng(0)
    emb = (rng.normal(size=(50, 4096)) * rng.uniform(0.1, 10.0, size=4096)).astype(np.float32)
    want = np.array([sum(float(v) * float(v) for v in row) for row in emb.astype(np.float64)[:5]])
    got = landmarks._squared_norms(emb)
    assert got.dtype == np.float64 and got.shape == (50,)
    np.testing.assert_allclose(got[:5], want, rtol=1e-12)
    np.testing.assert_allclose(landmarks._squared_norms(emb, block=7), got, rtol=0, atol=0)  # blocks: same sums


def test_bandwidth_subsample_of_rows_draws_among_those_rows():
    """With more candidates than ``sample``, the median bandwidth subsamples the candidates' rows: the same σ as the
    gathered copy ``x[rows]`` under the same generator, never rows outside ``rows``."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 3))
    x[::2] *= 100.0  # the excluded rows are far more spread: any of them in the subsample moves the median
    rows = np.arange(1, 60, 2)[::-1].copy()
    got = landmarks._median_sigma(x, np.random.default_rng(2), sample=8, rows=rows)
    want = landmarks._median_sigma(x[rows], np.random.default_rng(2), sample=8)
    gathered = x[rows][np.random.default_rng(2).choice(30, size=8, replace=False)]
    pairs = [np.sum((a - b) ** 2) for i, a in enumerate(gathered) for b in gathered[i + 1 :]]
    assert got == pytest.approx(want, rel=1e-12) and got == pytest.approx(np.sqrt(np.median(pairs)), rel=1e-12)


def _seed_whose_columns_leave_out_row_0(through_choose: bool) -> int:
    """A seed whose 11 Nyström columns of 12 rows miss row 0 (``choose`` first draws its landmark/held-out order)."""
    for seed in range(100):
        rng = np.random.default_rng(seed)
        if through_choose:
            rng.choice(12, size=12, replace=False)
        if 0 not in rng.choice(12, size=11, replace=False):
            return seed
    raise AssertionError("no seed in 100 leaves row 0 out")


def test_a_sample_beyond_every_nystrom_column_keeps_a_positive_leverage_score():
    """A sample so far from every Nyström column that its kernel row underflows to 0 would have score 0: it could
    never be drawn, and a budget of every candidate could not be drawn at all. The scores are floored at 1e-12."""
    emb = np.random.default_rng(1).normal(size=(12, 2))
    emb[0] += 1e4
    seed = _seed_whose_columns_leave_out_row_0(through_choose=False)
    scores = landmarks.leverage_scores(emb, 1e-2, 11, np.random.default_rng(seed))
    assert scores[0] == 1e-12 and scores[1:].min() > 1e-6
    ids = [f"s{i:02d}" for i in range(12)]  # id order is row order: candidate 0 is row 0
    config = landmarks.LandmarkConfig(strategy="leverage", leverage_columns=11)
    seed = _seed_whose_columns_leave_out_row_0(through_choose=True)
    picked, _ = landmarks.choose(ids, 12, 0, seed, config, embeddings=emb)
    assert sorted(picked) == ids
