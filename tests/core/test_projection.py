"""Projections: the WHT is the orthonormal Hadamard matrix, and both JL projectors keep geometry."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from idistill_core.errors import ConfigError
from idistill_core.projection import RademacherProjector, SRHTProjector, fwht


@pytest.mark.parametrize("n", [1, 2, 8, 256, 1024])
def test_fwht_equals_dense_orthonormal_hadamard(n):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    dense = torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64)) / math.sqrt(n)
    torch.testing.assert_close(fwht(x), x @ dense.T, rtol=0, atol=1e-12)


def test_fwht_is_orthonormal_and_self_inverse():
    n = 512  # more than one 128-point factor, so the Kronecker passes are exercised
    eye = torch.eye(n, dtype=torch.float64)
    h = fwht(eye)
    torch.testing.assert_close(h @ h.T, eye, rtol=0, atol=1e-12)
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fwht(fwht(x)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(fwht(x).norm(dim=1), x.norm(dim=1), rtol=1e-12, atol=0)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ConfigError, match="power-of-two"):
        fwht(torch.zeros(2, 12))


def test_srht_equals_its_dense_definition():
    proj = SRHTProjector(in_dim=100, out_dim=16, seed=5)
    assert proj.n_pad == 128
    h = torch.from_numpy(scipy.linalg.hadamard(128).astype(np.float32)) / math.sqrt(128)
    dense = (h * proj.signs)[proj.index][:, :100] * math.sqrt(128 / 16)  # (16, 100)
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(proj.project(x), x @ dense.T, rtol=1e-5, atol=1e-5)


def test_srht_with_all_coordinates_is_an_isometry():
    proj = SRHTProjector(in_dim=64, out_dim=64, seed=0)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(proj.project(x) @ proj.project(x).T, x @ x.T, rtol=1e-4, atol=1e-4)


def _unit_vectors(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).float()


@pytest.mark.parametrize(
    "make", [lambda: SRHTProjector(3000, 1024, seed=7), lambda: RademacherProjector(3000, 1024, seed=7)]
)
def test_projectors_keep_inner_products_within_jl_tolerance(make):
    proj = make()
    x = _unit_vectors(40, 3000, seed=11)
    exact = x @ x.T
    approx = proj.project(x) @ proj.project(x).T
    # Each projected inner product of unit vectors has standard deviation <= sqrt(2/k); over 820
    # pairs, 6 standard deviations is never reached by chance and a wrong scale fails it.
    tol = 6 * math.sqrt(2 / proj.out_dim)
    err = (approx - exact).abs()
    assert err.max() < tol
    # Mean squared norm must be unbiased: the average over 40 vectors is within 4 sd of 1.
    sq = approx.diagonal()
    assert abs(sq.mean().item() - 1) < 4 * math.sqrt(2 / proj.out_dim) / math.sqrt(40)
    # And the errors are not all zero (an identity "projection" would not reduce dimension).
    assert err.max() > 1e-3


def test_rademacher_chunked_path_equals_resident_matrix():
    resident = RademacherProjector(500, 64, seed=3, chunk=128)
    streamed = RademacherProjector(500, 64, seed=3, chunk=128, cache_limit=0)
    assert streamed._matrix is None
    m = resident.matrix()
    assert set(torch.unique(m * 8).tolist()) == {-1.0, 1.0}
    x = torch.randn(4, 500, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(streamed.project(x), x @ m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resident.project(x), x @ m, rtol=1e-5, atol=1e-5)


def test_projectors_are_deterministic_per_seed():
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    for cls in (SRHTProjector, RademacherProjector):
        a = cls(300, 32, seed=1).project(x)
        b = cls(300, 32, seed=1).project(x)
        c = cls(300, 32, seed=2).project(x)
        assert torch.equal(a, b)  # bitwise: same input, shapes and process, so the same kernels
        assert not torch.allclose(a, c)
        assert a.dtype == torch.float32 and a.shape == (2, 32)


def test_bad_dimensions_raise_config_errors():
    with pytest.raises(ConfigError, match="out_dim"):
        SRHTProjector(100, 200, seed=0)
    with pytest.raises(ConfigError, match="in_dim"):
        RademacherProjector(0, 8)
    with pytest.raises(ConfigError, match=r"\(B, 10\)"):
        SRHTProjector(10, 4).project(torch.zeros(2, 11))
