"""The pool QP in float32 and streamed over the coefficient table (issue 11): same answer as float64 dense,
and no N × L float64 copy of the coefficients."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from idistill_core.steps import pool_qp
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
    config = pool_qp.PoolQPConfig(compute_dtype="float32", coefficients="stream", chunk_rows=700)
    p_pool, quad = pool_qp.pool_terms(table, terms, config)
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
    p_pool, quad = pool_qp.pool_terms(c64.float(), terms, pool_qp.PoolQPConfig(compute_dtype="float32", chunk_rows=64))
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
    config = pool_qp.PoolQPConfig(compute_dtype=dtype, coefficients="stream", chunk_rows=123)  # uneven last chunk
    quad = pool_qp.PoolQuadratic(table, terms, config)
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
    config = pool_qp.PoolQPConfig(coefficients="stream", chunk_rows=chunk)
    big = n * num_l  # any tensor this large would be a whole copy of C
    seen: list[int] = []
    real_from_numpy = torch.from_numpy

    def from_numpy(array):  # every block entering torch, as the QP sees it
        seen.append(array.size)
        return real_from_numpy(array)

    torch.from_numpy = from_numpy
    try:
        p_pool, quad = pool_qp.pool_terms(table, terms, config)
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
    quad = pool_qp.PoolQuadratic(small, terms, pool_qp.PoolQPConfig(coefficients="auto", memory_limit_mib=1))
    passes = small.passes
    v = torch.rand(n, dtype=torch.float64)
    assert float((quad(v) - dense @ v).norm() / (dense @ v).norm()) <= 1e-5
    assert not quad.streamed and small.passes == passes and quad._matrix.dtype == torch.float32
    large = FakeTable(c64.numpy())
    quad = pool_qp.PoolQuadratic(large, terms, pool_qp.PoolQPConfig(coefficients="auto", memory_limit_mib=0))
    quad(v)
    assert quad.streamed and large.passes == 1 + 2  # the setup pass, then Cᵀv and C r


# -- the working-set pool QP (issue 24): a few passes over C, the dense problem's answer ---------------------------
def _curved(seed: int, scale: float, negative: float = 0.0, n: int = 2000, num_l: int = 32):
    """A pool problem whose QP support reaches far below the top of p (strong curvature); with ``negative`` > 0 the
    landmark Q is indefinite (a Hessian's negative directions), so the convexity floor is above 0."""
    c64, terms, _ = _problem(n, num_l, seed=seed)
    q = terms.q * scale
    if negative:
        y = torch.randn(num_l, 2, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
        q = q - negative * (y @ y.T) / num_l
    terms = SecondOrderTerms(p=terms.p, q=q, lr=terms.lr, num_source=terms.num_source)
    dense = c64 @ (terms.q * terms.num_source) @ c64.T / n
    return c64, terms, dense


def _assert_solves_the_dense_problem(sol, c64, terms, dense, k):
    """The weights are the dense float64 problem's solution at the solver's λ (a fixed point of its projected
    gradient step) with exactly ``k`` non-zeros, and the dense λ search finds the same support."""
    n = c64.shape[0]
    p_ref = c64 @ terms.p
    assert sol.exact and int((sol.weights > 0).sum()) == k
    lip = terms.lr * float(torch.linalg.eigvalsh(dense).max()) + sol.lam
    grad = terms.lr * (dense @ sol.weights) + sol.lam * sol.weights - p_ref
    moved = inf.project_simplex(sol.weights - grad / lip, float(n)) - sol.weights
    assert float(moved.abs().max()) <= 1e-5 * float(sol.weights.max())
    ref = inf.solve_qp(p_ref, dense, terms.lr, k)
    assert ref.exact
    assert set(ref.weights.nonzero().flatten().tolist()) == set(sol.weights.nonzero().flatten().tolist())
    return ref


def test_working_set_qp_gives_the_dense_answer_in_a_few_passes_over_the_table():
    n, k = 1000, 50
    c64, terms, dense = _curved(seed=1, scale=20.0, n=n)
    p_rank = torch.argsort(torch.argsort(-(c64 @ terms.p)))
    table = FakeTable(c64.numpy())
    config = pool_qp.PoolQPConfig(solver="working_set", coefficients="stream", working_rows=2 * k, chunk_rows=150)
    applications = 0
    real_call = pool_qp._WorkingSetQuadratic.__call__

    def counted(self, v):
        nonlocal applications
        applications += 1
        return real_call(self, v)

    pool_qp._WorkingSetQuadratic.__call__ = counted
    try:
        result = pool_qp.solve_pool_qp(table, terms, k, config=config)
    finally:
        pool_qp._WorkingSetQuadratic.__call__ = real_call
    sol = result.solution
    ref = _assert_solves_the_dense_problem(sol, c64, terms, dense, k)
    # the answer needs rows far below the first working set (the top 2k of p): only the KKT pass finds them
    assert int(p_rank[sol.weights > 0].max()) >= 2 * k
    assert result.rounds >= 2 and result.working_rows > 2 * k
    # hundreds of operator applications, each on the working rows; the table itself is read once per round + once
    assert table.passes == result.passes == 1 + result.rounds <= 5
    assert applications > 50 * table.passes
    np.testing.assert_allclose(result.p_pool.numpy(), (c64 @ terms.p).numpy(), rtol=1e-5, atol=1e-6)
    assert result.ids == table.ids
    # Cᵀw and wᵀQw from the working rows, no further pass
    w = sol.weights
    torch.testing.assert_close(result.coefficient_sum(w), c64.T @ w, rtol=1e-6, atol=1e-6)
    assert result.quadratic(w) == pytest.approx(float(w @ dense @ w), rel=1e-6)
    assert table.passes == result.passes
    assert sol.lam == pytest.approx(ref.lam, rel=0.05)  # both inside the interval of λ giving exactly k


def test_working_set_qp_uses_the_whole_pools_convexity_floor_with_an_indefinite_q():
    n, k = 1000, 60
    c64, terms, dense = _curved(seed=2, scale=5.0, negative=0.02, n=n, num_l=24)
    assert float(torch.linalg.eigvalsh(dense).min()) < 0
    matrix = c64.float()  # an in-memory C: passes are sweeps of it
    result = pool_qp.solve_pool_qp(matrix, terms, k, config=pool_qp.PoolQPConfig(solver="working_set", working_rows=2 * k))
    ref = _assert_solves_the_dense_problem(result.solution, c64, terms, dense, k)
    # the floor is −η λ_min of the whole pool's Q (the working rows' Q alone has a higher minimum)
    assert ref.lam_floor > 0
    assert result.solution.lam_floor == pytest.approx(ref.lam_floor, rel=1e-5)
    assert result.passes == 1 + result.rounds and result.ids is None


def test_working_set_qp_falls_back_to_the_full_solver_when_its_rows_cannot_grow():
    n, k = 600, 30
    c64, terms, dense = _curved(seed=1, scale=20.0, n=n, num_l=16)
    table = FakeTable(c64.numpy())
    # memory for the first working set only: the violators cannot join, so the whole-pool solver answers
    config = pool_qp.PoolQPConfig(  # float64 products: the full solver's FISTA then stops on its tolerance, not max_iter
        solver="working_set", coefficients="stream", working_rows=k, memory_limit_mib=0, compute_dtype="float64"
    )
    result = pool_qp.solve_pool_qp(table, terms, k, config=config)
    assert result.solver == "full" and result.working_rows == n
    _assert_solves_the_dense_problem(result.solution, c64, terms, dense, k)
    auto = pool_qp.solve_pool_qp(FakeTable(c64.numpy()), terms, k, config=dataclasses.replace(config, solver="auto"))
    assert auto.solver == "full"  # auto: a working set that does not fit is not tried


# -- the pipeline's pool QP: exact landmark rows, caps, weights as the ranking, the budget curve ------------------
def _arrays(terms: SecondOrderTerms, constant: float = 0.0) -> dict:
    from idistill_core.pipeline.second_order import terms_to_arrays

    return terms_to_arrays(
        SecondOrderTerms(p=terms.p, q=terms.q, lr=terms.lr, num_source=terms.num_source, constant=constant)
    )


def test_qp_outcome_keeps_the_landmarks_exact_terms_and_ranks_by_weight():
    from idistill_core.pipeline.recipe import SelectionRecipe
    from idistill_core.pipeline.second_order import qp_outcome

    n, num_l = 300, 20
    c64, terms, _ = _problem(n, num_l, seed=4)
    table = FakeTable(c64.numpy())
    landmark_ids = table.ids[:num_l]  # the problem's landmarks are its first rows
    ids = table.ids
    out = qp_outcome(ids, c64.numpy(), _arrays(terms), 15, SelectionRecipe(), landmark_ids=None)
    assert not np.allclose(out.details["p_pool"][:num_l], terms.p.numpy())  # KRR's rows are not unit rows
    exact = qp_outcome(ids, c64.numpy(), _arrays(terms), 15, SelectionRecipe(), landmark_ids=landmark_ids)
    np.testing.assert_allclose(exact.details["p_pool"][:num_l], terms.p.numpy(), rtol=0, atol=1e-12)
    # the table path substitutes the same rows
    streamed = qp_outcome(None, _LandmarkTable(table, landmark_ids), _arrays(terms), 15, SelectionRecipe(),
                          landmark_ids=landmark_ids)
    np.testing.assert_allclose(streamed.details["p_pool"][:num_l], terms.p.numpy(), rtol=0, atol=1e-6)
    # the scores are the weights, and the picks come in weight order
    np.testing.assert_array_equal(exact.scores, exact.weights)
    order = [exact.sample_ids.index(s) for s in exact.selected]
    assert list(exact.weights[order]) == sorted(exact.weights[order], reverse=True)
    assert np.count_nonzero(exact.weights) == len(exact.selected) == 15


class _LandmarkTable(FakeTable):
    """FakeTable that knows its landmark ids, as a CoefficientTable does."""

    def __init__(self, table: FakeTable, landmark_ids):
        super().__init__(table._c)
        self.landmark_ids = list(landmark_ids)


def test_qp_outcome_honours_a_per_source_cap():
    from idistill_core.pipeline.recipe import SelectionRecipe
    from idistill_core.pipeline.second_order import qp_outcome

    n, num_l = 200, 16
    c64, terms, _ = _problem(n, num_l, seed=5)
    ids = [f"s{i:05d}" for i in range(n)]
    free = qp_outcome(ids, c64.numpy(), _arrays(terms), 12, SelectionRecipe())
    # every sample of the free pick's most frequent source: a cap of 2 must move the support
    source_of = {s: ("hot" if s in free.selected[:6] else f"src{i % 7}") for i, s in enumerate(ids)}
    capped = qp_outcome(ids, c64.numpy(), _arrays(terms), 12, SelectionRecipe(per_source_cap=2), source_of=source_of)
    assert len(capped.selected) == 12 and sum(source_of[s] == "hot" for s in capped.selected) <= 2
    assert np.count_nonzero(capped.weights) == 12 and np.isclose(capped.weights.sum(), n)


def test_budget_curve_is_the_model_evaluated_at_each_budgets_qp_weights():
    """Identity coefficients make the pool the landmarks: the curve's predictions must equal the terms' own
    ``predicted_change`` at the QP's weights, and first order's column its top-k prediction."""
    num_l = 40
    _, terms, _ = _problem(num_l, num_l, seed=6)
    terms = SecondOrderTerms(p=terms.p, q=terms.q * 50, lr=terms.lr, num_source=num_l, constant=0.25,
                             constant_first=0.2)
    curve = inf.budget_curve(terms.p, terms.q, terms.lr, [20, 5, 10], float(num_l), terms.constant,
                             constant_first=terms.constant_first)
    assert [pt.k for pt in curve] == [5, 10, 20]
    for pt in curve:
        w = inf.solve_qp(terms.p, terms.q, terms.lr, pt.k, float(num_l)).weights
        assert pt.predicted_change == pytest.approx(terms.predicted_change(w), rel=1e-9)
        w1 = inf.first_order_weights(terms.p, pt.k, float(num_l))
        assert pt.first_order_change == pytest.approx(terms.predicted_change_first_order(w1), rel=1e-9)
    # first order's prediction only improves as the subset narrows onto the largest p
    firsts = [pt.first_order_change for pt in curve]
    assert firsts == sorted(firsts)


def test_qp_outcome_budget_curve_covers_the_grid_and_agrees_with_the_selection_at_its_budget():
    """The curve's point at the selection's own budget is a full solve (``solve_qp`` over ``Q_pool``); the
    outcome's ``predicted_change`` comes from the working-set solver: the two must agree (to the width of the λ
    interval that gives exactly ``k`` non-zeros: the two λ searches stop at different points of it)."""
    from idistill_core.pipeline.recipe import SelectionRecipe
    from idistill_core.pipeline.second_order import CURVE_FRACTIONS, qp_outcome

    n, num_l, budget = 300, 20, 15
    c64, terms, _ = _problem(n, num_l, seed=7)
    ids = [f"s{i:05d}" for i in range(n)]
    out = qp_outcome(ids, c64.numpy(), _arrays(terms, constant=0.3), budget, SelectionRecipe())
    curve = out.details["budget_curve"]
    assert [pt["k"] for pt in curve] == sorted({round(f * n) for f in CURVE_FRACTIONS} | {budget})
    at_budget = next(pt for pt in curve if pt["k"] == budget)
    assert at_budget["predicted_change"] == pytest.approx(out.details["predicted_change"], rel=5e-3)
    assert all(pt["predicted_change"] != pt["first_order_change"] for pt in curve)
