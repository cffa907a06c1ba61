"""Step 3, weights: the paper's constrained QP over the pool, and its first-order closed form (paper §1.4–1.5).

The weights solve  min −pᵀw + ½wᵀ(ηQ + λI)w  s.t.  w ≥ 0, Σw = total,  with λ binary-searched so that exactly
``k`` weights are non-zero. Over the pool, ``p = C p_L`` and ``Q = C Q_L Cᵀ`` are lifted from the landmarks
with the propagation coefficients ``C (N, L)`` (:class:`PoolQuadratic` never forms ``Q``). With ``Q = 0`` the
solution is the simplex projection of ``p/λ`` and its support the top-k of ``p`` (:func:`first_order_weights`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from idistill_core.errors import ConfigError, DataError, NumericalError
from idistill_core.steps.second_order import SecondOrderTerms

logger = logging.getLogger("idistill")


QApply = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PoolQPConfig:
    """How the pool QP holds and multiplies the coefficients ``C (N, L)`` (issue 11: fit N = 1M in memory).

    Only ``C`` is ``N × L``; everything else the QP keeps is ``O(N + L²)``: the ``L × L`` terms, ``CᵀC``, the
    λ search and FISTA's ``N``-vectors stay float64. ``C`` is stored float32 (the coefficient table's dtype),
    so a float64 copy of it would add no information, only 8 bytes per entry.
    """

    compute_dtype: Literal["float32", "float64"] = "float32"
    """Least dtype of the per-chunk products ``C_chunk·r`` and ``C_chunkᵀ·v`` (their sums over chunks are
    float64); a float64 ``C`` given in memory is multiplied in float64 regardless. ``float32`` multiplies the
    stored float32 values directly (half the memory traffic of float64, and no per-product upcast copy); its
    rounding is ~1e-7 relative per product, far below what moves the support. ``float64`` upcasts one chunk
    at a time (``chunk_rows · L`` doubles)."""
    coefficients: Literal["auto", "memory", "stream"] = "auto"
    """Where ``C`` lives during the solve when it comes from a coefficient table. ``memory``: read once into a
    float32 ``(N, L)`` matrix (fast; ``4·N·L`` bytes). ``stream``: re-read the table chunk by chunk for every
    product (peak ``O(chunk_rows · L + N)``; slower, each product reads the table). ``auto``: ``memory`` when
    ``4·N·L`` bytes fit in ``memory_limit_mib``, else ``stream``. An in-memory matrix is used as given."""
    memory_limit_mib: int = 2048
    """``auto``'s bound on the resident float32 ``C``."""
    chunk_rows: int = 16384
    """Rows of ``C`` per product block (and per table read)."""

    def __post_init__(self) -> None:
        if self.compute_dtype not in ("float32", "float64"):
            raise ConfigError(f"PoolQPConfig.compute_dtype must be 'float32' or 'float64'; got {self.compute_dtype!r}")
        if self.coefficients not in ("auto", "memory", "stream"):
            raise ConfigError(
                f"PoolQPConfig.coefficients must be 'auto', 'memory' or 'stream'; got {self.coefficients!r}"
            )
        if self.memory_limit_mib < 0:
            raise ConfigError(f"PoolQPConfig.memory_limit_mib must be >= 0; got {self.memory_limit_mib}")
        if self.chunk_rows < 1:
            raise ConfigError(f"PoolQPConfig.chunk_rows must be >= 1; got {self.chunk_rows}")

class ChunkSource(Protocol):
    """What ``PoolQuadratic`` streams from (``propagate.CoefficientTable``): ``C`` in row blocks, table order."""

    @property
    def num_landmarks(self) -> int: ...

    def iter_chunks(self, batch_rows: int = ...) -> Iterator[tuple[list[str], np.ndarray]]: ...

class PoolQuadratic:
    """``Q_pool = (L/N) · C Q_L Cᵀ`` as a callable, never formed (``C``: KRR coefficients ``(N, L)``).

    Each pool gradient is modelled as ``g_i ≈ Σ_j C_ij g_j`` (landmark gradients), so
    ``G_pool ≈ C G_L`` and, with ``Q = (1/|S|) G H Gᵀ``, ``Q_pool = (1/N) C (L·Q_L) Cᵀ``.

    A product ``v ↦ C (M (Cᵀ v))`` is two passes over ``C`` in ``config.chunk_rows`` blocks: ``Cᵀv`` summed in
    float64 over blocks, the ``L × L`` core in float64, then ``C r`` block by block into a float64 ``N``-vector.
    ``C`` is either an in-memory matrix (used as given, never copied whole) or a ``ChunkSource`` (a
    coefficient table), which is read into float32 memory or re-streamed per product (``PoolQPConfig``).

    Args:
        coefficients: ``(N, L)`` tensor/array, or a ``ChunkSource``.
        terms: landmark ``SecondOrderTerms`` (``q`` scaled by ``1/terms.num_source``).
        config: dtype and streaming choices; defaults to ``PoolQPConfig()``.

    Attributes:
        ids: the table's sample ids in row order (None for an in-memory matrix).
        n: ``N``.
        streamed: True when every product re-reads the table.
    """

    def __init__(
        self,
        coefficients: torch.Tensor | np.ndarray | ChunkSource,
        terms: SecondOrderTerms,
        config: PoolQPConfig | None = None,
    ):
        self.config = config = config or PoolQPConfig()
        num_l = terms.q.shape[0]
        self._dtype = torch.float32 if config.compute_dtype == "float32" else torch.float64
        self.ids: list[str] | None = None
        self._table: ChunkSource | None = None
        self._matrix: torch.Tensor | None = None
        if hasattr(coefficients, "iter_chunks"):
            if coefficients.num_landmarks != num_l:
                raise DataError(f"coefficient table has L={coefficients.num_landmarks}; the terms have L={num_l}")
            self._table = coefficients
        else:
            c = torch.as_tensor(coefficients).detach()  # numpy arrays are wrapped, not copied
            if c.ndim != 2 or c.shape[1] != num_l:
                raise DataError(f"coefficients must be (N, {num_l}); got {tuple(c.shape)}")
            self._matrix = c
            self._dtype = torch.promote_types(self._dtype, c.dtype if c.is_floating_point() else torch.float32)
        # One pass: ids, N and CᵀC (float64, L × L) for the exact eigenvalue bounds.
        gram = torch.zeros(num_l, num_l, dtype=torch.float64)
        ids: list[str] = []
        n = 0
        resident: torch.Tensor | None = None  # the table read once into float32, filled in place (no 2x peak)
        if self._table is not None:
            size = coefficients.count() if hasattr(coefficients, "count") else None
            keep = config.coefficients == "memory" or (
                config.coefficients == "auto"
                and size is not None
                and 4 * size * num_l <= config.memory_limit_mib * 2**20
            )
            if keep and size is None:
                raise ConfigError("PoolQPConfig.coefficients='memory' needs a coefficient source with count()")
            resident = torch.empty(size, num_l, dtype=torch.float32) if keep else None
        for chunk_ids, block in self._blocks():
            if chunk_ids is not None:
                ids += chunk_ids
            if not bool(torch.isfinite(block).all()):
                raise NumericalError(f"coefficients rows {n}..{n + block.shape[0]} have non-finite entries")
            b = block.to(self._dtype)
            gram += (b.T @ b).double()
            if resident is not None:
                if n + block.shape[0] > resident.shape[0]:
                    raise DataError(f"coefficient table has more rows than its count() ({resident.shape[0]})")
                resident[n : n + block.shape[0]] = block
            n += block.shape[0]
        if n == 0:
            raise DataError("coefficients have no rows")
        if self._table is not None:
            self.ids = ids
            if resident is not None:
                if n != resident.shape[0]:
                    raise DataError(f"coefficient table has {n} rows; its count() said {resident.shape[0]}")
                self._matrix = resident
                self._table = None
        self.n = n
        self.streamed = self._table is not None
        self._gram = gram
        self.core = terms.q.detach().to(torch.float64) * (terms.num_source / n)

    def _blocks(self) -> Iterator[tuple[list[str] | None, torch.Tensor]]:
        step = self.config.chunk_rows
        if self._table is None:
            assert self._matrix is not None
            for start in range(0, self._matrix.shape[0], step):
                yield None, self._matrix[start : start + step]  # a view
            return
        for chunk_ids, block in self._table.iter_chunks(step):
            yield chunk_ids, torch.from_numpy(np.asarray(block))

    def rmatvec(self, v: torch.Tensor) -> torch.Tensor:
        """``Cᵀ v`` ``(L,)`` float64 for ``v`` ``(N,)``, one block at a time."""
        out = torch.zeros(self.core.shape[0], dtype=torch.float64)
        start = 0
        for _, block in self._blocks():
            rows = block.shape[0]
            out += (block.to(self._dtype).T @ v[start : start + rows].to(self._dtype)).double()
            start += rows
        self._check_rows(start)
        return out

    def matvec(self, r: torch.Tensor) -> torch.Tensor:
        """``C r`` ``(N,)`` float64 for ``r`` ``(L,)``, one block at a time."""
        out = torch.empty(self.n, dtype=torch.float64)
        rc = r.to(self._dtype)
        start = 0
        for _, block in self._blocks():
            rows = block.shape[0]
            if start + rows > self.n:
                self._check_rows(start + rows)
            out[start : start + rows] = block.to(self._dtype) @ rc
            start += rows
        self._check_rows(start)
        return out

    def _check_rows(self, rows: int) -> None:
        if rows != self.n:
            raise DataError(f"coefficient table changed during the QP: {rows} rows read, {self.n} expected")

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(self.core @ self.rmatvec(v.to(torch.float64)))

    def eig_bounds(self) -> tuple[float, float]:
        """Exact extreme eigenvalues, from an ``L × L`` problem: the non-zero spectrum of ``C M Cᵀ``
        equals that of ``Rᵀ M R`` with ``CᵀC = R Rᵀ``; zero is in the spectrum when ``N > rank``."""
        evals_g, evecs_g = torch.linalg.eigh(self._gram)
        r = evecs_g * evals_g.clamp_min(0).sqrt()
        evals = torch.linalg.eigvalsh(r.T @ self.core @ r)
        lo, hi = float(evals.min()), float(evals.max())
        if self.n > self.core.shape[0]:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        return lo, hi

def pool_terms(
    coefficients: torch.Tensor | np.ndarray | ChunkSource, terms: SecondOrderTerms, config: PoolQPConfig | None = None
) -> tuple[torch.Tensor, PoolQuadratic]:
    """Lift landmark terms to the pool: ``p_pool = C p_L`` ``(N,)`` float64 and ``Q_pool`` as a callable."""
    quad = PoolQuadratic(coefficients, terms, config)
    return quad.matvec(terms.p.detach().to(torch.float64)), quad

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
    w = project_simplex(p / lam, total)
    return w
