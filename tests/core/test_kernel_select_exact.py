"""Kernel selection on its default path (``cv_directions=64`` seeded directions, issue 25): every grid point's CV
error against an independent numpy K-fold KRR on ``g · r``, on a case where the first gradient coordinate
alone would rank the grid differently, and the sketched error against the exact ``‖ĝ − g‖²`` it estimates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from idistill_core.steps.kernel_select import select_kernel
from idistill_core.steps.propagate import PropagateConfig
from tests.core.test_propagate_select import _median_sigma, _numpy_krr, _rbf

SEED, FOLDS, M = 3, 4, 64


def _world(n=48, d=3, p=128, seed=0):
    """Gradients whose coordinate 0 is linear in the embedding and whose other 127 coordinates are an RBF
    function of it: coordinate 0 alone favours the linear kernel, the whole gradient the RBF one."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    sigma = 0.5 * _median_sigma(x)
    g = _rbf(x, rng.normal(size=(20, d)), sigma) @ rng.normal(size=(20, p))
    g[:, 0] = x @ rng.normal(size=d)
    return x, g + 1e-3 * rng.normal(size=g.shape)


def _cv_errors(x, y, points):
    """K-fold (seeded permutation dealt round-robin, as documented in kernel_select) relative squared error of
    numpy KRR predicting the columns of ``y``, per grid point."""
    n = len(x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SEED)).numpy()
    folds = [perm[i::FOLDS] for i in range(FOLDS)]
    errors = []
    for point in points:
        sse = 0.0
        for test in folds:
            train = np.setdiff1d(np.arange(n), test)
            sigma = None if point.kernel == "linear" else point.bandwidth_scale * _median_sigma(x)
            pred = _numpy_krr(x[train], y[train], x[test], point.kernel, sigma, point.ridge)
            sse += float(((pred - y[test]) ** 2).sum())
        errors.append(sse / float((y**2).sum()))
    return np.array(errors)


def test_default_cv_scores_the_whole_gradient_through_seeded_directions_not_one_coordinate():
    x, g = _world()
    config = PropagateConfig(kernel="auto", ridge="auto", cv_folds=FOLDS, seed=SEED)
    assert config.cv_directions == M < g.shape[1]  # the default, sketched path
    sel = select_kernel(x, g, config)
    assert sel.directions == M and len(sel.grid) == 2 * len(config.ridge_grid)
    # the directions: r ~ N(0, I/M) drawn from a torch generator seeded with config.seed, shape (P, M)
    r = torch.randn(g.shape[1], M, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64).numpy() / M**0.5
    expected = _cv_errors(x, g @ r, sel.grid)
    np.testing.assert_allclose([p.error for p in sel.grid], expected, rtol=1e-6, atol=1e-12)
    assert sel.best == sel.grid[int(np.argmin(expected))] and sel.config.kernel == "rbf"
    # coordinate 0 alone would have chosen another grid point (the linear kernel): the case tells them apart
    first_only = _cv_errors(x, g[:, :1], sel.grid)
    assert sel.grid[int(np.argmin(first_only))].kernel == "linear"
    # and what the directions estimate is the exact gradient error ‖ĝ − g‖² / ‖g‖² (E[(e·r)²] = ‖e‖²)
    full = _cv_errors(x, g, sel.grid)
    assert int(np.argmin(full)) == int(np.argmin(expected))
    np.testing.assert_allclose(expected, full, rtol=0.15)


def test_cv_directions_at_least_the_gradient_width_scores_the_whole_vectors():
    x, g = _world(p=M)  # P == cv_directions: a sketch would not be smaller, so the exact vectors are scored
    sel = select_kernel(x, g, PropagateConfig(kernel="auto", ridge="auto", cv_folds=FOLDS, seed=SEED))
    assert sel.directions == 0
    np.testing.assert_allclose([p.error for p in sel.grid], _cv_errors(x, g, sel.grid), rtol=1e-6, atol=1e-12)


def test_cv_needs_four_landmarks_and_names_the_bad_input():
    from idistill_core.errors import DataError, NumericalError

    rng = np.random.default_rng(0)
    config = PropagateConfig(kernel="auto", ridge="auto", cv_directions=0)
    sel = select_kernel(rng.normal(size=(4, 2)), rng.normal(size=(4, 3)), config)  # 4 is enough: 4 folds of 1
    assert sel.landmarks == 4 and sel.folds == 4
    with pytest.raises(DataError, match="at least 4 landmarks"):
        select_kernel(rng.normal(size=(3, 2)), rng.normal(size=(3, 3)), config)
    with pytest.raises(DataError, match="landmark_emb must be 2-D"):
        select_kernel(rng.normal(size=5), rng.normal(size=(5, 3)), config)
    grads = rng.normal(size=(5, 3))
    grads[2, 1] = np.nan
    with pytest.raises(NumericalError, match="landmark_grads has non-finite entries"):
        select_kernel(rng.normal(size=(5, 2)), grads, config)


def test_the_report_summary_markdown_and_metadata_state_the_grid_exactly():
    x, g = _world(n=24, p=8)
    config = PropagateConfig(kernel="auto", ridge="auto", bandwidth_scale="auto", bandwidth_grid=(0.5, 1.0),
                             ridge_grid=(1e-3, 0.1), cv_folds=FOLDS, cv_directions=0, seed=SEED)
    sel = select_kernel(x, g, config)
    e = {(p.kernel, p.bandwidth_scale, p.ridge): p.error for p in sel.grid}
    assert list(e) == [("rbf", 0.5, 1e-3), ("rbf", 0.5, 0.1), ("rbf", 1.0, 1e-3), ("rbf", 1.0, 0.1),
                       ("linear", None, 1e-3), ("linear", None, 0.1)]
    best = min(e, key=e.get)
    assert best[0] == "rbf" and sel.best.error == e[best] and sel.worst.error == max(e.values())
    c = sel.config
    assert (c.kernel, c.bandwidth_scale, c.ridge) == best
    assert sel.median_sigma == pytest.approx(_median_sigma(x), rel=1e-12)
    assert sel.sigma == pytest.approx(best[1] * _median_sigma(x), rel=1e-12)
    tail = (f"ridge={best[2]:g} chosen by {FOLDS}-fold CV over 24 landmarks: relative error {e[best]:.4f} "
            f"(worst grid point {max(e.values()):.4f})")
    assert sel.summary() == f"kernel=rbf bandwidth={best[1]:g}×median (σ={sel.sigma:.4g}) {tail}"
    linear = dataclasses.replace(sel, config=dataclasses.replace(c, kernel="linear"), sigma=None)
    assert linear.summary() == f"kernel=linear {tail}"

    def cell(key):
        text = f"{e[key]:.4f}"
        return f"**{text}**" if key == best else text

    rows = [("rbf", 0.5, "0.5"), ("rbf", 1.0, "1"), ("linear", None, "")]
    expected = ["| kernel | bandwidth × median | ridge 0.001 | ridge 0.1 |", "|---|---|---|---|"] + [
        f"| {k} | {label} | {cell((k, s, 1e-3))} | {cell((k, s, 0.1))} |" for k, s, label in rows
    ]
    assert sel.markdown() == "\n".join(expected)
    assert sel.metadata() == {
        "kernel": "rbf", "bandwidth_scale": best[1], "sigma": sel.sigma, "ridge": best[2],
        "cv_error": e[best], "cv_error_worst": max(e.values()), "cv_folds": FOLDS, "cv_directions": 0,
        "grid": [{"kernel": k, "bandwidth_scale": s, "ridge": r, "error": err} for (k, s, r), err in e.items()],
    }
    assert linear.metadata()["bandwidth_scale"] is None and linear.metadata()["kernel"] == "linear"


def test_fixed_fields_are_one_point_grids_and_a_linear_winner_keeps_a_concrete_bandwidth():
    from idistill_core.steps.propagate import KernelRidge

    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 4))
    g = x @ rng.normal(size=(4, 12)) + 0.01 * rng.normal(size=(40, 12))  # a linear truth
    base = PropagateConfig(cv_folds=FOLDS, cv_directions=0, seed=SEED)
    fixed_kernel = select_kernel(x, g, dataclasses.replace(base, kernel="rbf", ridge="auto"))
    assert {p.kernel for p in fixed_kernel.grid} == {"rbf"} and fixed_kernel.config.kernel == "rbf"
    fixed_ridge = select_kernel(x, g, dataclasses.replace(base, kernel="auto", ridge=0.05))
    assert [(p.kernel, p.ridge) for p in fixed_ridge.grid] == [("rbf", 0.05), ("linear", 0.05)]
    linear_only = select_kernel(x, g, dataclasses.replace(base, kernel="linear", ridge="auto"))
    assert linear_only.median_sigma is None and linear_only.sigma is None
    assert {p.bandwidth_scale for p in linear_only.grid} == {None}
    # the linear kernel wins; the chosen config must still be concrete (no 'auto' left) and keep a fixed bandwidth
    auto_band = select_kernel(x, g, dataclasses.replace(base, kernel="auto", ridge="auto", bandwidth_scale="auto"))
    assert auto_band.config.kernel == "linear" and auto_band.config.bandwidth_scale == 1.0
    assert not auto_band.config.needs_selection
    two = select_kernel(x, g, dataclasses.replace(base, kernel="auto", ridge="auto", bandwidth_scale=2.0))
    assert two.config.kernel == "linear" and two.config.bandwidth_scale == 2.0
    # the CV's σ is the final fit's σ, also when the median comes from a seeded subset of the landmarks
    xr, gr = _world(n=24, p=8)
    sub = select_kernel(xr, gr, dataclasses.replace(base, kernel="rbf", ridge="auto", bandwidth_sample=8))
    assert sub.sigma == KernelRidge.fit(xr, sub.config).sigma
