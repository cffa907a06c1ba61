"""First-order landmark values and centring against numpy (issue 25, the mutmut survivors of ``steps/influence.py``
listed in docs/mutation-testing.md): numpy and float32 inputs, tensors that still require grad, the dtype a
centred float32 block keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idistill_core.errors import DataError
from idistill_core.steps.influence import center_gradients, landmark_values


def _grads(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(6, 5)), rng.normal(size=(3, 5))


@pytest.mark.parametrize("aggregate", ["mean", "rr"])
def test_landmark_values_of_float32_numpy_gradients_are_float64_dot_products(aggregate):
    lg, tg = _grads()
    lg32, tg32 = lg.astype(np.float32), tg.astype(np.float32)
    expected = np.array([[float(np.dot(lg32[j], tg32[i])) for i in range(3)] for j in range(6)])
    if aggregate == "mean":
        expected = expected.mean(axis=1, keepdims=True)
    got = landmark_values(lg32, tg32, aggregate)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_landmark_values_of_tensors_that_require_grad_are_detached_float64():
    lg, tg = _grads(1)
    lg_t = torch.tensor(lg, dtype=torch.float32, requires_grad=True)
    tg_t = torch.tensor(tg, dtype=torch.float32, requires_grad=True)
    got = landmark_values(lg_t, tg_t, "mean")
    assert got.dtype == np.float64 and got.shape == (6, 1)
    np.testing.assert_allclose(got[:, 0], lg @ tg.mean(axis=0), rtol=1e-5, atol=1e-5)


def test_centring_a_float32_block_keeps_float32_with_a_float64_mean():
    lg, _ = _grads(2)
    mean = lg.mean(axis=0)
    got = center_gradients(torch.tensor(lg, dtype=torch.float32), torch.from_numpy(mean))
    assert got.dtype == torch.float32
    centred = lg - mean
    np.testing.assert_allclose(got.numpy(), centred / np.linalg.norm(centred, axis=1, keepdims=True), atol=1e-6)


def test_one_one_dimensional_input_is_a_data_error():
    lg, tg = _grads(3)
    for a, b in ((lg[0], tg), (lg, tg[0])):
        with pytest.raises(DataError, match="must be 2-D"):
            landmark_values(torch.from_numpy(a), torch.from_numpy(b), "mean")
