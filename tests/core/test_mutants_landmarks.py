"""Leverage scores over a subset of rows (issue 25, the mutmut survivors of ``steps/landmarks.py`` listed in
docs/mutation-testing.md): ``rows=`` must score exactly the gathered copy ``emb[rows]`` — its bandwidth, its
Nyström columns and its kernel rows all from those rows, none from the excluded ones."""

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
