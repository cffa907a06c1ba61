"""Kernel ridge propagation: interpolation, streaming, a dense reference solve, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from idistill_core.errors import ConfigError, DataError
from idistill_core.propagate import KernelRidge, PropagateConfig, median_bandwidth


def _data(n_land=40, n_pool=300, d=6, t=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_land, d)), rng.normal(size=(n_pool, d)), rng.normal(size=(n_land, t))


def _dense_reference(land, pool, values, kernel, ridge, sigma=None):
    """Textbook KRR in numpy: K_E (K + ridge·mean(diag K) I)^-1 values, via np.linalg.solve."""

    def k(a, b):
        if kernel == "linear":
            return a @ b.T
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * sigma**2))

    kll = k(land, land)
    kll = kll + ridge * np.mean(np.diag(kll)) * np.eye(len(land))
    return k(pool, land) @ np.linalg.solve(kll, values)


def test_all_samples_as_landmarks_with_tiny_ridge_reproduce_their_values():
    land, _, values = _data(n_land=25)
    krr = KernelRidge.fit(land, PropagateConfig(ridge=1e-10))
    torch.testing.assert_close(krr.predict(values, [land]), torch.from_numpy(values), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_prediction_equals_dense_numpy_solve(kernel):
    land, pool, values = _data()
    cfg = PropagateConfig(kernel=kernel, ridge=1e-2)
    krr = KernelRidge.fit(land, cfg)
    sigma = None
    if kernel == "rbf":
        d2 = ((land[:, None] - land[None]) ** 2).sum(-1)
        pairs = np.sort(d2[np.triu_indices(len(land), 1)])
        sigma = float(np.sqrt(pairs[(len(pairs) - 1) // 2]))  # lower median, as torch.median
        assert krr.sigma == pytest.approx(sigma)
    expected = _dense_reference(land, pool, values, kernel, 1e-2, sigma)
    np.testing.assert_allclose(krr.predict(values, [pool]).numpy(), expected, rtol=1e-8, atol=1e-10)
    # Coefficients are the same linear map applied to the values.
    coef = krr.coefficients(pool)
    np.testing.assert_allclose((coef @ torch.from_numpy(values)).numpy(), expected, rtol=1e-8, atol=1e-10)


def test_chunked_prediction_equals_unchunked():
    land, pool, values = _data()
    whole = KernelRidge.fit(land, PropagateConfig()).predict(values, [pool])
    small = KernelRidge.fit(land, PropagateConfig(chunk_size=7))
    ragged = [pool[:13], pool[13:14], pool[14:200], torch.from_numpy(pool[200:])]
    torch.testing.assert_close(small.predict(values, ragged), whole, rtol=1e-12, atol=1e-12)
    assert sum(b.shape[0] for b in small.iter_predict(values, [pool])) == pool.shape[0]


def test_bandwidth_is_deterministic_per_seed_and_uses_the_subset():
    land, _, _ = _data(n_land=120)
    cfg = PropagateConfig(bandwidth_sample=30, seed=3)
    s1 = KernelRidge.fit(land, cfg).sigma
    assert s1 == KernelRidge.fit(land, cfg).sigma
    assert s1 == median_bandwidth(torch.from_numpy(land), 30, 3)
    other = KernelRidge.fit(land, dataclasses.replace(cfg, seed=4)).sigma
    assert other != s1  # a different subset, hence a different median
    full = KernelRidge.fit(land, PropagateConfig(bandwidth_sample=1000)).sigma
    assert full != s1


def test_config_and_input_errors_are_one_liners():
    with pytest.raises(ConfigError, match="PropagateConfig.ridge"):
        PropagateConfig(ridge=0.0)
    with pytest.raises(ConfigError, match="PropagateConfig.kernel"):
        PropagateConfig(kernel="poly")
    land, pool, values = _data()
    krr = KernelRidge.fit(land, PropagateConfig())
    with pytest.raises(DataError, match=r"emb_chunks\[0\] has D=5"):
        krr.predict(values, [pool[:, :5]])
    with pytest.raises(DataError, match="one per landmark"):
        krr.predict(values[:3], [pool])
    assert PropagateConfig().fingerprint() != PropagateConfig(ridge=0.1).fingerprint()
