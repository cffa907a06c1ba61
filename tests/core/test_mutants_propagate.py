"""Kernel ridge edge cases (issue 25, the mutmut survivors of ``steps/propagate.py`` listed in
docs/mutation-testing.md): an empty pool, the extension's link to its fit, and which input a non-finite or
wrongly shaped array is reported as."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from idistill_core.errors import ConfigError, DataError, NumericalError
from idistill_core.steps.propagate import KernelRidge, PropagateConfig, median_bandwidth


def _fit():
    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    model = KernelRidge.fit(pool[:12], PropagateConfig(ridge=0.05))
    values = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    return pool, model, values


def test_predicting_no_pool_rows_gives_an_empty_float64_block_with_one_column_per_target():
    _, model, values = _fit()
    for chunks in ([], iter(())):
        out = model.predict(values, chunks)
        assert out.shape == (0, 3) and out.dtype == torch.float64


def test_an_extension_keeps_its_fit_and_its_correction_is_float64_for_float32_inputs():
    pool, model, values = _fit()
    ext = model.extend(pool[20:24])
    assert ext.model is model
    c = model.coefficients(pool)
    extra_values = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)
    args64 = (c @ values, c @ ext.cross, model.kernel_between(pool, ext.emb), values, extra_values)
    want = ext.correction(*args64)
    got = ext.correction(*(a.float() for a in args64))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", ["base", "coef_cross", "kernel_rows", "values", "extra_values"])
def test_a_non_finite_correction_input_is_named(bad):
    pool, model, values = _fit()
    ext = model.extend(pool[20:24])
    c = model.coefficients(pool)
    args = {
        "base": c @ values,
        "coef_cross": c @ ext.cross,
        "kernel_rows": model.kernel_between(pool, ext.emb),
        "values": values,
        "extra_values": torch.zeros(4, 3, dtype=torch.float64),
    }
    args[bad] = args[bad].clone()
    args[bad][1, 0] = float("nan")
    with pytest.raises(NumericalError, match=rf"^{bad} has non-finite entries$"):
        ext.correction(**args)


def test_non_finite_values_and_a_one_dimensional_extension_are_named():
    pool, model, values = _fit()
    bad = values.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(NumericalError, match=r"^values has non-finite entries$"):
        model.predict(bad, [pool])
    with pytest.raises(DataError, match=r"^extra_emb must be 2-D; got shape \(4,\)$"):
        model.extend(np.zeros(4))


def test_no_rows_in_give_no_coefficient_rows_out_and_a_fit_needs_a_landmark():
    pool, model, _ = _fit()
    out = model.coefficients(pool[:0])
    assert out.shape == (0, 12) and out.dtype == torch.float64
    with pytest.raises(DataError, match=r"^landmark_emb has no rows$"):
        KernelRidge.fit(np.zeros((0, 4)))
    with pytest.raises(DataError, match=r"^landmark_emb must be 2-D; got shape \(4,\)$"):
        KernelRidge.fit(np.zeros(4))
    with pytest.raises(NumericalError, match=r"^emb_chunks\[1\] has non-finite entries$"):
        model.predict(torch.zeros(12, 1, dtype=torch.float64), [pool[:5].numpy(), np.full((2, 4), np.nan)])


def test_a_model_built_from_a_fits_parts_predicts_what_the_fit_predicts():
    pool, model, values = _fit()
    rebuilt = KernelRidge(model.landmarks, model.config, model.sigma, model.ridge_abs, model._chol)
    assert rebuilt.ridge_abs == model.ridge_abs > 0
    torch.testing.assert_close(rebuilt.predict(values, [pool]), model.predict(values, [pool]), rtol=0, atol=0)


def test_one_landmark_predicts_its_kernel_times_its_value_over_one_plus_the_ridge():
    # one landmark: no pair for the median heuristic, so σ = 1; K(l, l) = 1 and the absolute ridge is 0.1 · 1
    landmark = np.array([[0.5, -1.0, 2.0]])
    pool = np.array([[0.5, -1.0, 2.0], [1.5, -1.0, 2.0], [0.0, 0.0, 0.0]])
    model = KernelRidge.fit(landmark, PropagateConfig(ridge=0.1))
    assert model.sigma == 1.0
    got = model.predict(np.array([[2.0, -4.0]]), [pool]).numpy()
    k = np.exp(-((pool - landmark) ** 2).sum(axis=1) / 2.0)
    np.testing.assert_allclose(got, k[:, None] * np.array([[2.0, -4.0]]) / 1.1, rtol=1e-12, atol=1e-15)


def test_two_landmarks_give_their_distance_as_bandwidth_and_duplicates_the_floor():
    pair = np.array([[0.0, 0.0], [0.3, 0.4]])  # distance 0.5: one pair, its median is itself
    assert median_bandwidth(torch.from_numpy(pair), 1000, 0) == pytest.approx(0.5, rel=1e-12)
    same = np.array([[1.0, 2.0], [1.0, 2.0]])
    assert median_bandwidth(torch.from_numpy(same), 1000, 0) == 1e-6


def test_the_seed_range_is_exactly_the_32_bit_unsigned_integers():
    for seed in (0, 100, 2**32 - 2, 2**32 - 1):
        assert PropagateConfig(seed=seed).seed == seed
    for seed in (-1, 2**32, 2**32 + 1):
        with pytest.raises(ConfigError, match="seed must be in"):
            PropagateConfig(seed=seed)


def test_python_lists_are_read_in_float64_and_tensors_that_require_grad_are_detached():
    # landmarks and pool rows as Python lists (0.1, 0.7, 0.3 are not float32 numbers); `predict` reads `values`
    # with torch.as_tensor first (float32 for a list), so the values go in as a float64 array
    landmarks = [[0.0, 0.1], [0.7, -0.3], [0.2, 0.9], [-0.5, 0.4]]
    values = np.array([[0.1], [0.7], [-0.3], [1e-9]])
    pool = [[0.1, 0.1], [0.3, 0.3]]
    model = KernelRidge.fit(landmarks, PropagateConfig(kernel="linear", ridge=0.1))
    lm, v, x = np.array(landmarks), values, np.array(pool)
    k = lm @ lm.T
    want = x @ lm.T @ np.linalg.solve(k + 0.1 * np.mean(np.diag(k)) * np.eye(4), v)
    np.testing.assert_allclose(model.predict(values, [pool]).numpy(), want, rtol=1e-12, atol=1e-15)
    grad_values = torch.tensor(values, requires_grad=True)
    np.testing.assert_allclose(model.predict(grad_values, [pool]).numpy(), want, rtol=1e-12, atol=1e-15)


def test_config_bounds_accept_their_smallest_values_and_refuse_bad_grids():
    cfg = PropagateConfig(cv_folds=2, bandwidth_sample=2, chunk_size=1)
    assert (cfg.cv_folds, cfg.bandwidth_sample, cfg.chunk_size) == (2, 2, 1)
    pool, model, values = _fit()
    one_row_chunks = KernelRidge.fit(model.landmarks, dataclasses.replace(model.config, chunk_size=1))
    torch.testing.assert_close(one_row_chunks.predict(values, [pool]), model.predict(values, [pool]), rtol=1e-12, atol=1e-12)
    for grid in ([1e-3, 1e-2], (), (0.0, 1.0)):
        with pytest.raises(ConfigError, match="ridge_grid must be a non-empty tuple of values > 0"):
            PropagateConfig(ridge_grid=grid)


def test_predict_keeps_python_list_values_in_float64():
    """Values given as a Python list are read as float64 (a float32 read first would round 1 + 1e-12 to 1)."""
    pool, model, _ = _fit()
    values = [[1.0 + 1e-12 * (i + 1)] for i in range(12)]
    want = model.coefficients(pool) @ torch.tensor(values, dtype=torch.float64)
    got = model.predict(values, [pool])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    assert not torch.equal(got, model.coefficients(pool) @ torch.ones(12, 1, dtype=torch.float64))
