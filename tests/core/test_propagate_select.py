"""Kernel / bandwidth / ridge chosen by cross-validation over the landmarks' own gradients (``auto``), and the
optional gradient centring: checked against independent numpy computations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from idistill_core.errors import ConfigError, DataError
from idistill_core.steps.kernel_select import select_kernel
from idistill_core.steps.propagate import KernelRidge, PropagateConfig

AUTO = PropagateConfig(kernel="auto", ridge="auto", bandwidth_scale="auto", cv_directions=0)


def _median_sigma(x):
    """sqrt of the lower median of the pairwise squared distances (the pipeline's median heuristic)."""
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    pairs = np.sort(d2[np.triu_indices(len(x), 1)])
    return float(np.sqrt(pairs[(len(pairs) - 1) // 2]))


def _rbf(a, b, sigma):
    return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * sigma**2))


def _numpy_krr(train_x, train_y, test_x, kernel, sigma, ridge):
    """Textbook KRR: K_te (K_tr + ridge · mean(diag K_tr) I)⁻¹ Y, with np.linalg.solve."""
    k = (lambda a, b: a @ b.T) if kernel == "linear" else (lambda a, b: _rbf(a, b, sigma))
    k_tr = k(train_x, train_x)
    return k(test_x, train_x) @ np.linalg.solve(k_tr + ridge * np.mean(np.diag(k_tr)) * np.eye(len(train_x)), train_y)


def _rbf_world(n=120, d=3, p=24, scale=0.5, noise=1e-3, seed=0):
    """Landmarks and 'gradients' that are a known RBF function of the embeddings, of bandwidth scale × median."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + 400, d))
    sigma = scale * _median_sigma(x[:n])
    centres, w = rng.normal(size=(30, d)), rng.normal(size=(30, p))
    g = _rbf(x, centres, sigma) @ w + noise * rng.normal(size=(n + 400, p))
    return x[:n], g[:n], x[n:], g[n:], sigma


@pytest.mark.parametrize(("noise", "ridges"), [(1e-3, (1e-4, 1e-3)), (0.3, (1e-2, 1e-1, 1.0))])
def test_cv_recovers_the_bandwidth_of_a_known_rbf_truth_and_beats_the_worst_grid_point_on_fresh_data(noise, ridges):
    x, g, x_new, g_new, sigma_true = _rbf_world(n=80, scale=0.5, noise=noise)
    sel = select_kernel(x, g, AUTO)
    assert sel.config.kernel == "rbf" and not sel.config.needs_selection
    assert sel.config.bandwidth_scale == 0.5, sel.markdown()
    assert sel.config.ridge in ridges, sel.markdown()  # nearly noise-free: a small ridge; noisy: a larger one
    assert abs(sel.sigma - sigma_true) / sigma_true < 0.05
    assert len(sel.grid) == 5 * 5 + 5  # rbf bandwidths × ridges, plus linear × ridges

    # fresh samples from the same function, independent numpy KRR: the chosen point beats the worst one
    def fresh_error(point):
        sigma = None if point.kernel == "linear" else point.bandwidth_scale * _median_sigma(x)
        pred = _numpy_krr(x, g, x_new, point.kernel, sigma, point.ridge)
        return float(((pred - g_new) ** 2).sum() / (g_new**2).sum())

    assert fresh_error(sel.best) < 0.5 * fresh_error(sel.worst)
    # the final fit with the chosen config is the same KRR
    krr = KernelRidge.fit(x, sel.config)
    expected = _numpy_krr(x, g, x_new, "rbf", 0.5 * _median_sigma(x), sel.config.ridge)
    np.testing.assert_allclose(krr.predict(g, [x_new]).numpy(), expected, rtol=1e-6, atol=1e-8)


def test_cv_errors_equal_an_independent_k_fold_computation_and_a_linear_truth_picks_the_linear_kernel():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 5))
    g = x @ rng.normal(size=(5, 16)) + 0.01 * rng.normal(size=(60, 16))
    config = PropagateConfig(kernel="auto", ridge="auto", cv_folds=4, cv_directions=0, seed=7)
    sel = select_kernel(x, g, config)
    assert sel.config.kernel == "linear"
    assert sel.config.bandwidth_scale == 1.0  # fixed fields stay as given
    assert {p.bandwidth_scale for p in sel.grid if p.kernel == "rbf"} == {1.0}
    # folds: a seeded permutation dealt round-robin into k folds (documented in kernel_select._folds)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(7)).numpy()
    folds = [perm[i::4] for i in range(4)]
    for point in sel.grid[::3]:
        sse = 0.0
        for test in folds:
            train = np.setdiff1d(np.arange(60), test)
            sigma = None if point.kernel == "linear" else _median_sigma(x)
            pred = _numpy_krr(x[train], g[train], x[test], point.kernel, sigma, point.ridge)
            sse += ((pred - g[test]) ** 2).sum()
        assert point.error == pytest.approx(sse / (g**2).sum(), rel=1e-6, abs=1e-12), point


def test_random_directions_estimate_the_gradient_error_and_selection_is_deterministic_per_seed():
    x, g, *_ = _rbf_world(n=80, p=256, seed=2)
    full = select_kernel(x, g, dataclasses.replace(AUTO, cv_directions=0))
    sketched = select_kernel(x, g, dataclasses.replace(AUTO, cv_directions=64))
    assert sketched.directions == 64 and full.directions == 0
    assert sketched.config == dataclasses.replace(full.config, cv_directions=64)
    again = select_kernel(x, g, dataclasses.replace(AUTO, cv_directions=64))
    assert again == sketched  # same seed: same folds, directions, grid and choice
    other = select_kernel(x, g, dataclasses.replace(AUTO, cv_directions=64, seed=5))
    assert [p.error for p in other.grid] != [p.error for p in sketched.grid]
    assert "**" in sketched.markdown() and "ridge 0.0001" in sketched.markdown()
    assert "chosen by 5-fold CV over 80 landmarks" in sketched.summary()


def test_auto_config_errors_are_one_liners():
    with pytest.raises(ConfigError, match="PropagateConfig.ridge must be > 0 or 'auto'"):
        PropagateConfig(ridge="big")
    with pytest.raises(ConfigError, match="PropagateConfig.kernel"):
        PropagateConfig(kernel="poly")
    with pytest.raises(ConfigError, match="bandwidth_grid"):
        PropagateConfig(bandwidth_grid=(1.0, -2.0))
    with pytest.raises(ConfigError, match="choose them first with kernel_select"):
        KernelRidge.fit(np.zeros((4, 2)), AUTO)
    with pytest.raises(DataError, match="landmark_grads has 3 rows; landmark_emb has 5"):
        select_kernel(np.zeros((5, 2)), np.zeros((3, 4)), AUTO)
    assert PropagateConfig().fingerprint() != AUTO.fingerprint()


def test_auto_coefficient_table_uses_the_chosen_values_and_names_them_in_its_spec(tmp_path):
    from idistill_core.pipeline.propagation import build_coefficients
    from idistill_core.store.lance import EmbeddingStore, StoreIdentity

    rng = np.random.default_rng(0)
    store = EmbeddingStore.open(tmp_path, "emb", StoreIdentity("m", "r", 4))
    ids = [f"p{i:04d}" for i in range(200)]
    store.insert_missing(ids, rng.normal(size=(200, 4)).astype(np.float32))
    landmarks = ids[::5]
    emb = store.read(landmarks).astype(np.float64)
    grads = _rbf(emb, rng.normal(size=(10, 4)), 0.5 * _median_sigma(emb)) @ rng.normal(size=(10, 8))
    with pytest.raises(ConfigError, match="needs the landmark gradients"):
        build_coefficients(store, ids, landmarks, AUTO)
    table, report = build_coefficients(store, ids, landmarks, AUTO, landmark_grads=grads, chunk_rows=100)
    chosen = report.selection.config
    assert report.config == chosen and not chosen.needs_selection
    assert "chosen by 5-fold CV" in report.summary()
    fixed, fixed_report = build_coefficients(store, ids, landmarks, chosen, chunk_rows=100)
    assert fixed.name == table.name  # the chosen values (not 'auto') name the table: same rows, same table
    assert fixed_report.chunks_reused == 2 and fixed_report.selection is None
    assert "(fixed)" in fixed_report.summary()
    expected = KernelRidge.fit(store.read(landmarks), chosen).coefficients(store.read(ids[:7])).numpy()
    np.testing.assert_allclose(table.read(ids[:7]), expected, rtol=1e-5, atol=1e-6)


# -- gradient centring -----------------------------------------------------------------------------------------
def test_centring_removes_the_landmark_mean_and_renormalises():
    from idistill_core.steps.influence import center_gradients

    rng = np.random.default_rng(3)
    shared = rng.normal(size=32)
    g = rng.normal(size=(10, 32)) + 3 * shared
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    t = rng.normal(size=(4, 32)) + 3 * shared
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    mu = g.mean(axis=0)
    ref_g = (g - mu) / np.linalg.norm(g - mu, axis=1, keepdims=True)
    ref_t = (t - mu) / np.linalg.norm(t - mu, axis=1, keepdims=True)
    got_g = center_gradients(torch.from_numpy(g), torch.from_numpy(mu)).numpy()
    got_t = center_gradients(torch.from_numpy(t), torch.from_numpy(mu)).numpy()
    np.testing.assert_allclose(got_g, ref_g, rtol=1e-12)
    np.testing.assert_allclose(got_t, ref_t, rtol=1e-12)
    # the shared component inflates every raw score; centring takes it out
    assert (g @ t.T).mean() > 0.5 and abs((got_g @ got_t.T).mean()) < 0.3
