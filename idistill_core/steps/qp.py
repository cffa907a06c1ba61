"""Step 3, weights: the paper's constrained QP and its first-order closed form (paper §1.4–1.5).

The weights solve  min −pᵀw + ½wᵀ(ηQ + λI)w  s.t.  w ≥ 0, Σw = total,  with λ binary-searched so that exactly
``k`` weights are non-zero (:func:`solve_qp`, FISTA on the simplex). With ``Q = 0`` the solution is the simplex
projection of ``p/λ`` and its support the top-k of ``p`` (:func:`first_order_weights`). :func:`budget_curve`: the
model's predicted loss change at the best weights of each budget. The same QP over a whole pool, with ``p`` and
``Q`` lifted from the landmarks by the propagation coefficients, is :mod:`idistill_core.steps.pool_qp`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from idistill_core.errors import ConfigError, DataError, NumericalError

logger = logging.getLogger("idistill")


QApply = Callable[[torch.Tensor], torch.Tensor]


def project_simplex(v: torch.Tensor, total: float) -> torch.Tensor:
    """Euclidean projection of ``v`` ``(n,)`` onto ``{w ≥ 0, Σw = total}`` (sort-based, exact)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - total
    idx = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    rho = int((u - css / idx > 0).nonzero().max())
    tau = css[rho] / (rho + 1)
    return (v - tau).clamp_min(0)


@dataclass
class QPSolution:
    """Result of ``solve_qp``.

    Attributes:
        weights: ``(n,)`` float64, ``≥ 0``, summing to ``total``.
        lam: the ridge ``λ`` found by the binary search.
        num_nonzero: non-zero count of ``weights`` (== k unless ``exact`` is False).
        exact: False when no λ gives exactly k (ties, or the PSD floor already gives more than k);
            the solution then has the closest count ≥ k found.
        lam_floor: ``max(0, −η λ_min(Q))``, the smallest λ keeping the problem convex.
    """

    weights: torch.Tensor
    lam: float
    num_nonzero: int
    exact: bool
    lam_floor: float


def _eig_bounds(q: torch.Tensor | QApply, n: int, dtype: torch.dtype, seed: int) -> tuple[float, float]:
    if isinstance(q, torch.Tensor):
        evals = torch.linalg.eigvalsh(0.5 * (q + q.T).to(dtype))
        return float(evals.min()), float(evals.max())
    bounds = getattr(q, "eig_bounds", None)
    if callable(bounds):
        return bounds()
    if n <= 2048:  # small enough to materialise column by column: exact bounds
        dense = torch.stack([q(col) for col in torch.eye(n, dtype=dtype)], dim=1)
        return _eig_bounds(dense, n, dtype, seed)
    # Power iteration for the largest magnitude, then on the shifted operator for the other end; a 10%
    # margin covers its slow convergence (the bounds only set the step size and the PSD floor).
    gen = torch.Generator().manual_seed(seed)

    def power(apply: QApply) -> float:
        x = torch.randn(n, generator=gen, dtype=dtype)
        x /= x.norm()
        val = 0.0
        for _ in range(200):
            y = apply(x)
            val = float(x @ y)
            norm = y.norm()
            if float(norm) == 0.0:
                return 0.0
            x = y / norm
        return val

    big = power(q)
    other = power(lambda x: q(x) - big * x) + big
    lo, hi = min(big, other), max(big, other)
    span = hi - lo
    return lo - 0.1 * span - 1e-12, hi + 0.1 * span + 1e-12


def _fista(
    p: torch.Tensor,
    apply_a: QApply,
    lipschitz: float,
    total: float,
    w0: torch.Tensor,
    max_iter: int,
    tol: float,
) -> torch.Tensor:
    """Accelerated projected gradient on ``−pᵀw + ½wᵀAw`` over the scaled simplex.

    Gradient-based adaptive restart (O'Donoghue & Candès 2015): momentum is dropped whenever it points
    against the last step, which restores linear convergence when the problem is strongly convex and
    costs no extra operator application.
    """
    step = 1.0 / lipschitz
    w = project_simplex(w0, total)
    y, t = w, 1.0
    for _ in range(max_iter):
        w_next = project_simplex(y - step * (apply_a(y) - p), total)
        delta = w_next - w
        if float((y - w_next) @ delta) > 0:
            t = 1.0
        t_next = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        y = w_next + ((t - 1) / t_next) * delta
        w, t = w_next, t_next
        if float(delta.norm()) <= tol * total:
            break
    return w


def solve_qp(
    p: torch.Tensor,
    q: torch.Tensor | QApply | None,
    eta: float,
    k: int,
    total: float | None = None,
    *,
    max_iter: int = 5000,
    tol: float = 1e-10,
    search_steps: int = 100,
    seed: int = 0,
    lam_hint: float | None = None,
    w0: torch.Tensor | None = None,
) -> QPSolution:
    """Solve ``min −pᵀw + ½wᵀ(ηQ + λI)w`` s.t. ``w ≥ 0, Σw = total`` with λ set for ``k`` non-zeros.

    λ is binary-searched in log space above ``λ_floor = max(0, −η λ_min(Q))`` (convexity). The support
    grows with λ (exactly so for ``Q = 0``, paper §1.5; in practice for ``Q ≠ 0``). Each solve is FISTA
    with exact simplex projection, warm-started from the previous one.

    Limitation: the support cannot shrink below that of the λ → λ_floor solution. With ``ηQ`` indefinite
    (λ_floor > 0), or PSD of high rank (the curvature itself spreads the weights), that support may
    exceed ``k``; no convex λ reaches ``k`` and that solution is returned with ``exact=False``
    (callers then keep the ``k`` largest weights, e.g. ``select.select_from_weights``). Lowering ``η`` or
    raising ``k`` avoids it.

    Args:
        p: ``(n,)`` linear term.
        q: ``(n, n)`` tensor, a callable ``v -> Q v`` (e.g. ``PoolQuadratic``), or None for ``Q = 0``.
        eta: learning rate ``η ≥ 0``.
        k: number of non-zero weights wanted, ``1 ≤ k ≤ n``.
        total: ``Σw``; defaults to ``n`` (paper §1.4).
        max_iter, tol: FISTA limits per λ.
        search_steps: binary-search iterations on λ.
        seed: power-iteration seed (callable ``q`` without ``eig_bounds`` only).
        lam_hint, w0: a λ (and weights) near the answer, e.g. from a slightly smaller problem
            (:func:`solve_pool_qp`'s working-set rounds): the search brackets λ around it (doubling/halving)
            instead of from the λ floor, which skips most of the search. Without them the search is unchanged.

    Returns:
        ``QPSolution``; if no λ gives exactly ``k`` (ties), the solution with the closest count ≥ k.
    """
    p = p.detach().to(torch.float64).reshape(-1)
    n = p.numel()
    if not 1 <= k <= n:
        raise ConfigError(f"k must be in [1, {n}]; got {k}")
    if eta < 0 or not math.isfinite(eta):
        raise ConfigError(f"eta must be finite and >= 0; got {eta}")
    total = float(n if total is None else total)
    if total <= 0:
        raise ConfigError(f"total must be > 0; got {total}")
    if not bool(torch.isfinite(p).all()):
        raise NumericalError("p has non-finite entries")

    if q is None or eta == 0.0:
        q_apply: QApply = lambda v: torch.zeros_like(v)
        lo_eig = hi_eig = 0.0
    elif isinstance(q, torch.Tensor):
        if q.shape != (n, n):
            raise DataError(f"Q must be ({n}, {n}); got {tuple(q.shape)}")
        qd = 0.5 * (q + q.T).detach().to(torch.float64)
        q_apply = lambda v: qd @ v
        lo_eig, hi_eig = _eig_bounds(qd, n, torch.float64, seed)
    else:
        q_apply = lambda v: q(v).to(torch.float64)
        lo_eig, hi_eig = _eig_bounds(q, n, torch.float64, seed)
    lam_floor = max(0.0, -eta * lo_eig)
    # p-scale: λ beyond this gives a near-uniform (all non-zero) solution; below the floor it is non-convex.
    spread = float(p.max() - p.min()) + eta * max(abs(lo_eig), abs(hi_eig)) * total
    lam_small = max(lam_floor * (1 + 1e-9), 1e-12 * max(spread, 1e-300))
    w_start = torch.full((n,), total / n, dtype=torch.float64)

    def solve(lam: float, w0: torch.Tensor) -> tuple[torch.Tensor, int]:
        lip = eta * max(hi_eig, 0.0) + lam
        w = _fista(p, lambda v: eta * q_apply(v) + lam * v, lip, total, w0, max_iter, tol)
        return w, int((w > 0).sum())

    best: tuple[float, torch.Tensor, int] | None = None  # (λ, w, nnz) with the smallest nnz ≥ k

    def consider(lam: float, w: torch.Tensor, nnz: int) -> None:
        nonlocal best
        if nnz >= k and (best is None or nnz < best[2]):
            best = (lam, w, nnz)

    if lam_hint is not None and math.isfinite(lam_hint) and lam_hint > lam_small:
        # bracket around the hint: one solve when it still gives k, a few doublings/halvings otherwise
        start = w_start if w0 is None else w0.detach().to(torch.float64).reshape(-1)
        w_h, nnz_h = solve(lam_hint, start)
        consider(lam_hint, w_h, nnz_h)
        lam_lo = lam_hi = lam_hint
        w_lo = w_hi = w_h
        nnz_lo = nnz_hi = nnz_h
        while nnz_hi < k and lam_hi < 1e300:
            lam_lo, w_lo, nnz_lo = lam_hi, w_hi, nnz_hi
            lam_hi *= 2
            w_hi, nnz_hi = solve(lam_hi, w_hi)
            consider(lam_hi, w_hi, nnz_hi)
        while nnz_lo > k and lam_lo > lam_small:
            lam_hi, w_hi, nnz_hi = lam_lo, w_lo, nnz_lo
            lam_lo = max(lam_lo / 2, lam_small)
            w_lo, nnz_lo = solve(lam_lo, w_lo)
            consider(lam_lo, w_lo, nnz_lo)
    else:
        w_lo, nnz_lo = solve(lam_small, w_start)
        consider(lam_small, w_lo, nnz_lo)
        lam_lo, lam_hi = lam_small, max(lam_small * 2, spread / total * n, 1e-12)
        w_hi, nnz_hi = solve(lam_hi, w_lo)
        consider(lam_hi, w_hi, nnz_hi)
        while nnz_hi < k and lam_hi < 1e300:
            lam_lo, w_lo, nnz_lo = lam_hi, w_hi, nnz_hi
            lam_hi *= 16
            w_hi, nnz_hi = solve(lam_hi, w_hi)
            consider(lam_hi, w_hi, nnz_hi)
    if nnz_lo < k:
        for _ in range(search_steps):
            if best is not None and best[2] == k:
                break
            lam_mid = math.sqrt(lam_lo * lam_hi)
            if not lam_lo < lam_mid < lam_hi:
                break
            w_mid, nnz_mid = solve(lam_mid, w_lo if nnz_lo else w_hi)
            consider(lam_mid, w_mid, nnz_mid)
            if nnz_mid < k:
                lam_lo, w_lo, nnz_lo = lam_mid, w_mid, nnz_mid
            else:
                lam_hi, w_hi, nnz_hi = lam_mid, w_mid, nnz_mid
    assert best is not None
    lam, w, nnz = best
    if nnz != k:
        logger.warning(
            "qp: no lambda gives exactly k=%d non-zero weights; returning %d (lambda=%.3g)", k, nnz, lam
        )
    logger.info("qp: k=%d non-zeros at lambda=%.6g (floor %.3g)", nnz, lam, lam_floor)
    return QPSolution(weights=w, lam=lam, num_nonzero=nnz, exact=nnz == k, lam_floor=lam_floor)


def qp_weights(
    p: torch.Tensor,
    q: torch.Tensor | QApply | None,
    eta: float,
    k: int,
    total: float | None = None,
    **kwargs,
) -> torch.Tensor:
    """Weights ``(n,)`` of ``solve_qp`` (DESIGN contract); λ is logged at INFO on ``idistill``."""
    return solve_qp(p, q, eta, k, total, **kwargs).weights


def first_order_weights(p: torch.Tensor, k: int, total: float | None = None) -> torch.Tensor:
    """Closed-form QP solution for ``Q = 0`` (paper §1.5): simplex projection of ``p/λ``.

    λ is placed mid-way in the interval where the support is exactly the top-``k`` of ``p``; if
    ``p_(k) == p_(k+1)`` (a tie at the cut) every tied entry joins, so the support is the closest
    size ≥ k.

    Args:
        p: ``(n,)``.
        k: support size, ``1 ≤ k ≤ n``.
        total: ``Σw``; defaults to ``n``.

    Returns:
        ``(n,)`` float64 weights, ``≥ 0``, summing to ``total``, non-zero exactly on the top-k.
    """
    p = p.detach().to(torch.float64).reshape(-1)
    n = p.numel()
    if not 1 <= k <= n:
        raise ConfigError(f"k must be in [1, {n}]; got {k}")
    total = float(n if total is None else total)
    if total <= 0:
        raise ConfigError(f"total must be > 0; got {total}")
    lam = first_order_lambda(p, k, total)
    w = project_simplex(p / lam, total)
    return w


def first_order_lambda(p: torch.Tensor, k: int, total: float) -> float:
    """The λ of :func:`first_order_weights`: mid-way in the interval where ``Q = 0``'s support is the top-k."""
    n = p.numel()
    u, _ = torch.sort(p, descending=True)
    m = int((u >= u[k - 1]).sum())  # k plus any entries tied with the k-th
    top = u[:m]
    # Support = top-m iff Σ(top − u_m) < λ·total ≤ Σ(top − u_{m+1}).
    lam_lo = float((top - u[m - 1]).sum()) / total
    if m < n:
        lam_hi = float((top - u[m]).sum()) / total
        lam = 0.5 * (lam_lo + lam_hi)
    else:
        lam = 2 * lam_lo + 1.0
    if lam <= 0:  # all of p equal: any λ gives the uniform solution on the support
        lam = 1.0
    return lam


@dataclass(frozen=True)
class BudgetPoint:
    """The model's prediction for the best weights at one budget (:func:`budget_curve`)."""

    k: int
    predicted_change: float
    """``constant + (η/total)(−pᵀw + (η/2) wᵀQw)`` at the QP's weights for ``k`` non-zeros."""
    first_order_change: float
    """``constant_first − (η/total) p_firstᵀw`` at first order's own weights for ``k`` (its top-k)."""
    lam: float
    exact: bool
    """False when no λ gave exactly ``k`` non-zeros (``QPSolution.exact``: an indefinite ``Q``'s convexity floor
    or ties); the prediction is then at the ``k`` largest weights renormalised, the subset selection keeps."""


def budget_curve(
    p: torch.Tensor,
    q: torch.Tensor | QApply | None,
    eta: float,
    budgets: list[int],
    total: float | None = None,
    constant: float = 0.0,
    p_first: torch.Tensor | None = None,
    constant_first: float = 0.0,
) -> list[BudgetPoint]:
    """Predicted target-loss change of the best ``k``-sample weights, for each ``k`` in ``budgets`` (ascending).

    One QP per budget (the λ search of :func:`solve_qp`); the first-order column is the same model without ``Q``
    at first order's closed-form weights, so the gap between the two is what the curvature adds: the second
    order predicts diminishing (or reversing) returns as the subset narrows, first order never does.
    """
    p = p.detach().to(torch.float64).reshape(-1)
    n = p.numel()
    total = float(n if total is None else total)
    p1 = p if p_first is None else p_first.detach().to(torch.float64).reshape(-1)
    apply = (lambda v: torch.zeros_like(v)) if q is None else ((lambda v: q @ v) if isinstance(q, torch.Tensor) else q)
    points = []
    for k in sorted({int(b) for b in budgets}):
        sol = solve_qp(p, q, eta, k, total)
        w = sol.weights
        if not sol.exact:  # a wider support (the convexity floor, ties): the k largest, as selection keeps them
            top = torch.topk(w, k)
            w = torch.zeros_like(w).index_copy_(0, top.indices, top.values)
            w = w * (total / w.sum())
        predicted = constant + eta / total * float(-(p @ w) + 0.5 * eta * (w @ apply(w).to(torch.float64)))
        w1 = first_order_weights(p1, k, total)
        points.append(BudgetPoint(k, predicted, constant_first - eta / total * float(p1 @ w1), sol.lam, sol.exact))
    return points
