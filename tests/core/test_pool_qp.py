"""The pool QP in float32 and streamed over the coefficient table (issue 11): same answer as float64 dense,
and no N × L float64 copy of the coefficients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idistill_core.steps import qp as inf
from idistill_core.steps.propagate import KernelRidge, PropagateConfig
from idistill_core.steps.second_order import SecondOrderTerms


class FakeTable:
    """A ``CoefficientTable`` stand-in: float32 chunks of a fixed matrix, recording every read."""

    def __init__(self, matrix: np.ndarray, batch_rows_cap: int | None = None):
        self._c = np.ascontiguousarray(matrix, dtype=np.float32)
        self.ids = [f"s{i:05d}" for i in range(self._c.shape[0])]
        self.reads: list[int] = []  # rows of every chunk handed out
        self.passes = 0

    @property
    def num_landmarks(self) -> int:
        return self._c.shape[1]

    def count(self) -> int:
        return self._c.shape[0]

    def iter_chunks(self, batch_rows: int = 16384):
        self.passes += 1
        for start in range(0, self._c.shape[0], batch_rows):
            block = self._c[start : start + batch_rows].copy()  # a fresh array, as a Lance read is
            self.reads.append(block.shape[0])
            yield self.ids[start : start + batch_rows], block

    def matrix(self):  # pragma: no cover - the streamed path must not call it
        raise AssertionError("the streamed QP read the whole matrix")

    def read(self, sample_ids):  # pragma: no cover
        raise AssertionError("the streamed QP read rows by id")


def _problem(n: int, num_l: int, seed: int = 0):
    """Realistic KRR coefficients of a clustered pool (landmarks = its first rows) and low-rank PSD landmark Q."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    emb = centers[torch.randint(0, 12, (n,), generator=gen)] + 0.4 * torch.randn(n, 8, generator=gen, dtype=torch.float64)
    c64 = KernelRidge.fit(emb[:num_l], PropagateConfig()).coefficients(emb)
    c64 = c64.float().double()  # the table stores float32: both paths see the same numbers
    x = torch.randn(num_l, 3, generator=gen, dtype=torch.float64)
    terms = SecondOrderTerms(
        p=torch.randn(num_l, generator=gen, dtype=torch.float64), q=x @ x.T / num_l, lr=0.5, num_source=num_l
    )
    dense = c64 @ (terms.q * terms.num_source) @ c64.T / n  # Q_pool = (|S|/N) C Q_L Cᵀ, formed in float64
    return c64, terms, dense


def test_streamed_float32_qp_matches_float64_dense_problem():
    n, num_l, k = 2000, 32, 100
    c64, terms, dense = _problem(n, num_l)
    table = FakeTable(c64.numpy())
    config = inf.PoolQPConfig(compute_dtype="float32", coefficients="stream", chunk_rows=700)
    p_pool, quad = inf.pool_terms(table, terms, config)
    assert quad.streamed and quad.ids == table.ids
    sol = inf.solve_qp(p_pool, quad, terms.lr, k, max_iter=2000, tol=1e-9)
    assert sol.exact and sol.num_nonzero == k

    # Independent reference: the float64 dense problem at the same λ, solved by FISTA on Q = C q Cᵀ itself.
    p_ref = c64 @ terms.p
    torch.testing.assert_close(p_pool, p_ref, rtol=1e-5, atol=1e-6)
    lip = terms.lr * float(dense.abs().sum(1).max()) + sol.lam  # Gershgorin: a valid (loose) step bound
    ref = inf._fista(p_ref, lambda v: terms.lr * (dense @ v) + sol.lam * v, lip, float(n), sol.weights, 4000, 1e-12)
    assert set(ref.nonzero().flatten().tolist()) == set(sol.weights.nonzero().flatten().tolist())
    # weights agree to 1e-5 of the largest weight (float32 products, ~1e-7 relative each)
    assert float((ref - sol.weights).abs().max()) <= 1e-5 * float(ref.max())
    # and the float32 solution is a fixed point of the float64 problem's projected-gradient step
    step = 1.0 / lip
    grad = terms.lr * (dense @ sol.weights) + sol.lam * sol.weights - p_ref
    moved = inf.project_simplex(sol.weights - step * grad, float(n)) - sol.weights
    assert float(moved.abs().max()) <= 1e-5 * float(sol.weights.max())


def test_float32_qp_and_lambda_search_match_the_float64_dense_path():
    # small enough for the existing dense path's full λ search
    n, num_l, k = 300, 16, 20
    c64, terms, dense = _problem(n, num_l, seed=3)
    ref = inf.solve_qp(c64 @ terms.p, dense, terms.lr, k)
    p_pool, quad = inf.pool_terms(c64.float(), terms, inf.PoolQPConfig(compute_dtype="float32", chunk_rows=64))
    sol = inf.solve_qp(p_pool, quad, terms.lr, k)
    assert ref.exact and sol.exact
    assert set(sol.weights.nonzero().flatten().tolist()) == set(ref.weights.nonzero().flatten().tolist())
    assert float((ref.weights - sol.weights).abs().max()) <= 1e-5 * float(ref.weights.max())
    assert sol.lam == pytest.approx(ref.lam, rel=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_streamed_apply_equals_dense_apply(dtype):
    n, num_l = 500, 24
    c64, terms, dense = _problem(n, num_l, seed=1)
    table = FakeTable(c64.numpy())
    config = inf.PoolQPConfig(compute_dtype=dtype, coefficients="stream", chunk_rows=123)  # uneven last chunk
    quad = inf.PoolQuadratic(table, terms, config)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.rand(n, generator=gen, dtype=torch.float64)
        want = dense @ v
        got = quad(v)
        assert float((got - want).norm() / want.norm()) <= 1e-5
    lo, hi = quad.eig_bounds()
    evals = torch.linalg.eigvalsh(dense)
    assert hi == pytest.approx(float(evals.max()), rel=1e-5)
    assert lo == pytest.approx(0.0, abs=1e-6 * hi)


def test_streamed_qp_reads_through_chunks_and_never_holds_n_by_l():
    n, num_l, chunk = 400, 16, 64
    c64, terms, _ = _problem(n, num_l, seed=4)
    table = FakeTable(c64.numpy())
    config = inf.PoolQPConfig(coefficients="stream", chunk_rows=chunk)
    big = n * num_l  # any tensor this large would be a whole copy of C
    seen: list[int] = []
    real_from_numpy = torch.from_numpy

    def from_numpy(array):  # every block entering torch, as the QP sees it
        seen.append(array.size)
        return real_from_numpy(array)

    torch.from_numpy = from_numpy
    try:
        p_pool, quad = inf.pool_terms(table, terms, config)
        passes_before = table.passes
        # a bounded run of the real solver: eigenvalue bounds, the λ bracket and FISTA products
        inf.solve_qp(p_pool, quad, terms.lr, 10, max_iter=20, search_steps=2)
    finally:
        torch.from_numpy = real_from_numpy
    # every product re-read the table in chunks of at most chunk_rows: nothing of C was kept between products
    assert table.passes > passes_before + 10
    assert max(table.reads) <= chunk and sum(table.reads) == table.passes * n
    assert max(seen) <= chunk * num_l
    # the operator holds only O(N + L²) tensors
    held = [v for v in vars(quad).values() if isinstance(v, (torch.Tensor, np.ndarray))]
    assert all((t.numel() if isinstance(t, torch.Tensor) else t.size) < big for t in held)


def test_auto_keeps_a_small_table_in_float32_memory_and_streams_a_large_one():
    n, num_l = 200, 8
    c64, terms, dense = _problem(n, num_l, seed=5)
    small = FakeTable(c64.numpy())
    quad = inf.PoolQuadratic(small, terms, inf.PoolQPConfig(coefficients="auto", memory_limit_mib=1))
    passes = small.passes
    v = torch.rand(n, dtype=torch.float64)
    assert float((quad(v) - dense @ v).norm() / (dense @ v).norm()) <= 1e-5
    assert not quad.streamed and small.passes == passes and quad._matrix.dtype == torch.float32
    large = FakeTable(c64.numpy())
    quad = inf.PoolQuadratic(large, terms, inf.PoolQPConfig(coefficients="auto", memory_limit_mib=0))
    quad(v)
    assert quad.streamed and large.passes == 1 + 2  # the setup pass, then Cᵀv and C r
