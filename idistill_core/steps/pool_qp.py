"""Step 3 over the pool: the QP of :mod:`idistill_core.steps.qp` with ``p = C p_L`` and ``Q = C Q_L Cᵀ`` lifted from the
landmarks by the propagation coefficients ``C (N, L)`` (:class:`PoolQuadratic` never forms ``Q``), solved by
:func:`solve_pool_qp` on a working set of rows checked against the whole pool's optimality conditions: a few passes
over ``C`` in all, whether ``C`` is in memory or streamed from its Lance table (issue 24).

Over 500 lines because the pool operator, the streamed blocks of ``C``, the candidate rows and the working-set loop
with its fallback to the full solver are one mechanism: each reads ``C`` the way the others expect.
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
from idistill_core.steps.qp import QApply, QPSolution, first_order_lambda, project_simplex, solve_qp
from idistill_core.steps.second_order import SecondOrderTerms

logger = logging.getLogger("idistill")


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
    solver: Literal["auto", "working_set", "full"] = "auto"
    """How :func:`solve_pool_qp` solves. ``working_set``: the QP on a candidate set of rows (the top of ``p``),
    then one pass over ``C`` checking every other row's optimality (KKT), violators added, until none: a few
    passes over ``C`` whatever the λ search costs (issue 24). ``full``: :class:`PoolQuadratic` over all ``N`` rows
    (two passes over ``C`` per operator application when ``C`` is streamed). ``auto``: ``working_set`` while its
    rows fit ``memory_limit_mib``, else ``full``."""
    working_rows: int = 0
    """``working_set``: rows of the first candidate set (0: ``max(2k, k + 1024)``, at most ``N``); each round
    adds at most as many violators."""
    max_rounds: int = 50
    """``working_set``: KKT rounds before falling back to the ``full`` solver."""

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
        if self.solver not in ("auto", "working_set", "full"):
            raise ConfigError(f"PoolQPConfig.solver must be 'auto', 'working_set' or 'full'; got {self.solver!r}")
        if self.working_rows < 0:
            raise ConfigError(f"PoolQPConfig.working_rows must be >= 0; got {self.working_rows}")
        if self.max_rounds < 1:
            raise ConfigError(f"PoolQPConfig.max_rounds must be >= 1; got {self.max_rounds}")


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


# -- the pool QP on a working set (issue 24) ---------------------------------------------------------------------
def _is_psd(q: torch.Tensor) -> bool:
    """Whether the symmetric ``q`` is positive semi-definite up to rounding (a Cholesky of ``q + δI``, ``O(L³/3)``)."""
    q = 0.5 * (q + q.T).detach().to(torch.float64)
    scale = float(q.abs().max()) if q.numel() else 0.0
    if scale == 0.0:
        return True
    shifted = q + (1e-10 * scale) * torch.eye(q.shape[0], dtype=torch.float64)
    return int(torch.linalg.cholesky_ex(shifted).info) == 0


def _extreme_eigenvalues(apply: QApply, n: int, steps: int = 48, seed: int = 0) -> tuple[float, float]:
    """Bounds ``(lo, hi)`` on the spectrum of a symmetric operator: Lanczos with full re-orthogonalisation, each
    Ritz value widened by its residual ``β·|s_last|`` (an eigenvalue lies within it) plus 1% of the span."""
    gen = torch.Generator().manual_seed(seed)
    steps = max(1, min(n, steps))
    basis = torch.empty(steps, n, dtype=torch.float64)
    q = torch.randn(n, generator=gen, dtype=torch.float64)
    q /= q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    last = 0.0
    for j in range(steps):
        basis[j] = q
        w = apply(q).to(torch.float64)
        alphas.append(float(q @ w))
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        last = float(w.norm())
        size = max(abs(a) for a in alphas) + max(betas, default=0.0)
        if last <= 1e-12 * size or j == steps - 1:
            break
        betas.append(last)
        q = w / last
    m = len(alphas)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        tri += torch.diag(off, 1) + torch.diag(off, -1)
    theta, vecs = torch.linalg.eigh(tri)
    residual = last * vecs[-1].abs()
    lo, hi = float((theta - residual).min()), float((theta + residual).max())
    margin = 0.01 * (hi - lo) + 1e-12 * max(abs(lo), abs(hi))
    return lo - margin, hi + margin


class _CountingSource:
    """A ``ChunkSource`` that counts full passes (``iter_chunks`` calls) over the table it wraps."""

    def __init__(self, source: ChunkSource):
        self._source = source
        self.passes = 0
        self.num_landmarks = source.num_landmarks
        if hasattr(source, "count"):
            self.count = source.count

    def iter_chunks(self, batch_rows: int = 16384):
        self.passes += 1
        return self._source.iter_chunks(batch_rows)


class _Blocks:
    """``C`` in row blocks from an in-memory matrix or a ``ChunkSource``; a table may be read into float32 memory
    on the first pass (``PoolQPConfig.coefficients``), after which passes are over memory."""

    def __init__(self, coefficients, num_l: int, config: PoolQPConfig):
        self.config = config
        self.table: _CountingSource | None = None
        self.matrix: torch.Tensor | None = None
        self.dtype = torch.float32 if config.compute_dtype == "float32" else torch.float64
        self.memory_passes = 0
        if hasattr(coefficients, "iter_chunks"):
            if coefficients.num_landmarks != num_l:
                raise DataError(f"coefficient table has L={coefficients.num_landmarks}; the terms have L={num_l}")
            self.table = _CountingSource(coefficients)
        else:
            c = torch.as_tensor(coefficients).detach()
            if c.ndim != 2 or c.shape[1] != num_l:
                raise DataError(f"coefficients must be (N, {num_l}); got {tuple(c.shape)}")
            self.matrix = c
            self.dtype = torch.promote_types(self.dtype, c.dtype if c.is_floating_point() else torch.float32)
        self._resident: torch.Tensor | None = None

    @property
    def passes(self) -> int:
        """Passes over ``C`` so far: reads of the table, or sweeps of the in-memory matrix."""
        return self.memory_passes + (self.table.passes if self.table is not None else 0)

    def count(self) -> int | None:
        if self.matrix is not None:
            return self.matrix.shape[0]
        return self.table.count() if hasattr(self.table, "count") else None

    def keep_resident(self, rows: int, num_l: int) -> None:
        """Read the table into a float32 ``(rows, L)`` matrix during the next pass."""
        self._resident = torch.empty(rows, num_l, dtype=torch.float32)

    def blocks(self) -> Iterator[tuple[list[str] | None, int, torch.Tensor]]:
        """``(ids or None, first row, block)`` over all of ``C`` (one pass)."""
        step = self.config.chunk_rows
        if self.matrix is not None:
            self.memory_passes += 1
            for start in range(0, self.matrix.shape[0], step):
                yield None, start, self.matrix[start : start + step]
            return
        assert self.table is not None
        start = 0
        resident = self._resident
        for chunk_ids, block in self.table.iter_chunks(step):
            block = torch.from_numpy(np.asarray(block))
            if resident is not None:
                if start + block.shape[0] > resident.shape[0]:
                    raise DataError(f"coefficient table has more rows than its count() ({resident.shape[0]})")
                resident[start : start + block.shape[0]] = block
            yield chunk_ids, start, block
            start += block.shape[0]
        if resident is not None:
            if start != resident.shape[0]:
                raise DataError(f"coefficient table has {start} rows; its count() said {resident.shape[0]}")
            self.matrix, self.table, self._resident = resident, None, None
            self.memory_passes = 1  # the table was read once; later passes are over memory

    def rmatvec(self, v: torch.Tensor, n: int) -> torch.Tensor:
        """``Cᵀ v`` ``(L,)`` float64 over all rows (one pass)."""
        out = None
        rows = 0
        for _, start, block in self.blocks():
            part = (block.to(self.dtype).T @ v[start : start + block.shape[0]].to(self.dtype)).double()
            out = part if out is None else out + part
            rows = start + block.shape[0]
        if rows != n:
            raise DataError(f"coefficient table changed during the QP: {rows} rows read, {n} expected")
        assert out is not None
        return out


class _TopRows:
    """The ``capacity`` rows with the largest score seen in a stream (ties: the earlier row), with their ``C`` rows;
    memory ``O(capacity · L)`` whatever the stream's length."""

    def __init__(self, capacity: int, width: int):
        self.capacity = capacity
        self.width = width
        self.score = torch.empty(0, dtype=torch.float64)
        self.index = torch.empty(0, dtype=torch.int64)
        self.rows: torch.Tensor | None = None
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending = 0
        self._cut = -math.inf
        self.offered = 0

    def offer(self, score: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows arrive in increasing ``index`` order; only those that can still enter are copied."""
        self.offered += int(score.numel())
        if self.capacity <= 0 or score.numel() == 0:
            return
        keep = score > self._cut  # a tie with the cut loses to the earlier row already kept
        if not bool(keep.any()):
            return
        self._parts.append((score[keep], index[keep], rows[keep].clone()))
        self._pending += int(keep.sum())
        if self._pending >= self.capacity:
            self._compact()

    def _compact(self) -> None:
        if not self._parts:
            return
        kept = [] if self.rows is None else [(self.score, self.index, self.rows)]
        parts = kept + self._parts
        score = torch.cat([s for s, _, _ in parts])
        index = torch.cat([i for _, i, _ in parts])
        rows = torch.cat([r for _, _, r in parts])
        order = torch.argsort(-score, stable=True)[: self.capacity]  # concatenated in index order: ties → earlier
        order = torch.sort(order).values
        self.score, self.index, self.rows = score[order], index[order], rows[order]
        self._parts, self._pending = [], 0
        if self.score.numel() >= self.capacity:
            self._cut = float(self.score.min())

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index (m,), rows (m, L))`` in index order."""
        self._compact()
        if self.rows is None:
            return self.index, torch.empty(0, self.width, dtype=torch.float32)
        return self.index, self.rows


class _WorkingSetQuadratic:
    """``Q_W = C_W M C_Wᵀ`` of the working rows ``C_W (m, L)`` float64: formed (``m × m``) when ``m ≤ L/2``, where
    that is cheaper than two products with ``C_W``; its spectrum bounds from Lanczos, with the FULL pool's lower
    bound ``lo`` (the convexity floor of the pool QP, not of the sub-problem).

    float64, not float32: the λ search's FISTA stops on a step of ``1e-10`` of ``total``, below float32 products'
    rounding, so float32 here runs every λ to ``max_iter`` (measured: 5,000 iterations per λ against ~50)."""

    def __init__(self, rows: torch.Tensor, core: torch.Tensor, lo: float, seed: int = 0):
        self.rows = rows
        self.core = core
        self.dtype = torch.float64
        self.lo = lo
        self.seed = seed
        self.dense: torch.Tensor | None = None
        m, num_l = rows.shape
        if m <= num_l // 2:
            r = rows.to(torch.float64)
            dense = r @ core @ r.T
            self.dense = 0.5 * (dense + dense.T)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return self.dense @ v.to(torch.float64)
        z = (self.rows.T @ v.to(self.dtype)).double()
        return (self.rows @ (self.core @ z).to(self.dtype)).double()

    def eig_bounds(self) -> tuple[float, float]:
        n = self.rows.shape[0]
        if self.dense is not None and n <= 2048:
            evals = torch.linalg.eigvalsh(self.dense)
            hi = float(evals.max())
        else:
            hi = _extreme_eigenvalues(self, n, seed=self.seed)[1]
        return self.lo, max(hi, self.lo)


@dataclass
class PoolQPResult:
    """:func:`solve_pool_qp`'s answer and what it cost.

    Attributes:
        solution: the pool QP's solution, ``weights`` ``(N,)`` float64.
        p_pool: ``C p_L`` ``(N,)`` float64 (the lifted linear term).
        ids: the table's sample ids in row order (None for an in-memory matrix).
        core: ``M = (|S|/N) Q_L`` ``(L, L)`` float64, so ``Q_pool = C M Cᵀ``.
        solver: ``working_set`` or ``full``.
        passes: passes over ``C`` (table reads, or sweeps of an in-memory ``C``), the setup pass included.
        rounds: working-set rounds (one KKT pass each; 0 for ``full``).
        working_rows: rows of the last working set (``N`` for ``full``).
    """

    solution: QPSolution
    p_pool: torch.Tensor
    ids: list[str] | None
    core: torch.Tensor
    solver: str
    passes: int
    rounds: int
    working_rows: int
    _sum: Callable[[torch.Tensor], torch.Tensor]

    @property
    def n(self) -> int:
        return int(self.p_pool.numel())

    def coefficient_sum(self, w: torch.Tensor) -> torch.Tensor:
        """``Cᵀ w`` ``(L,)`` float64 for pool weights ``w`` ``(N,)`` (no pass over ``C`` when ``w`` lives on the
        working set)."""
        return self._sum(w.detach().to(torch.float64).reshape(-1))

    def quadratic(self, w: torch.Tensor) -> float:
        """``wᵀ Q_pool w = (Cᵀw)ᵀ M (Cᵀw)``."""
        z = self.coefficient_sum(w)
        return float(z @ self.core @ z)


def solve_pool_qp(
    coefficients: torch.Tensor | np.ndarray | ChunkSource,
    terms: SecondOrderTerms,
    k: int,
    total: float | None = None,
    config: PoolQPConfig | None = None,
    *,
    max_iter: int = 5000,
    tol: float = 1e-10,
    search_steps: int = 100,
) -> PoolQPResult:
    """The pool QP ``min −p_poolᵀw + ½wᵀ(ηQ_pool + λI)w`` s.t. ``w ≥ 0, Σw = total`` with λ set for ``k`` non-zeros
    (:func:`solve_qp`), ``p_pool = C p_L``, ``Q_pool = C M Cᵀ``, in a few passes over ``C`` (issue 24).

    ``working_set`` (``PoolQPConfig.solver``): one pass computes ``p_pool`` and keeps the rows of its top
    ``working_rows`` entries; :func:`solve_qp` solves the QP on those rows alone (their ``C`` rows in memory, so
    its thousands of operator applications cost ``O(m·L)`` each, not a pass over ``C``); then ONE pass checks
    every other row ``i`` (weight 0) against the optimality (KKT) condition of the whole problem,
    ``p_i − η (Q_pool w)_i ≤ ν`` (``ν``: the multiplier of ``Σw``, read off the support), with
    ``(Q_pool w)_i = C_i · M (C_Wᵀ w_W)``. Violators (the largest first) join the working set and the QP is
    solved again, its λ search started at the last λ, until no row violates: the answer is then the whole
    problem's solution at that λ (convex for λ above the floor), with exactly the support a full solve would
    find at that λ. The floor ``max(0, −η λ_min(Q_pool))`` is the whole pool's: 0 when ``Q_L`` is PSD (checked by
    a Cholesky), else from ``CᵀC`` accumulated in the setup pass (``N·L²`` flops). "Violates" means by more than
    the sub-problem's own KKT residual (twice) or ``1e-6`` (float32 products; ``1e-12`` float64) of the terms'
    scale: a row closer than that to entering would enter with a weight at rounding level.

    Falls back to ``full`` (:class:`PoolQuadratic` and :func:`solve_qp` over all rows) when the working set would
    outgrow ``memory_limit_mib`` or ``max_rounds``, with a warning.

    Args:
        coefficients: ``C`` ``(N, L)`` in memory or a ``ChunkSource`` (the coefficient table).
        terms: the landmarks' ``SecondOrderTerms`` (``lr`` is η).
        k: non-zero weights wanted.
        total: ``Σw`` (default ``N``).
        config: see :class:`PoolQPConfig`.
    """
    config = config or PoolQPConfig()
    num_l = terms.q.shape[0]
    eta = float(terms.lr)
    blocks = _Blocks(coefficients, num_l, config)
    size = blocks.count()
    row_bytes = num_l * 4
    budget_rows = config.memory_limit_mib * 2**20 // row_bytes
    want = max(k, config.working_rows or max(2 * k, k + 1024))
    if size is not None:
        want = min(want, size)
        if not 1 <= k <= size:
            raise ConfigError(f"k must be in [1, {size}]; got {k}")
    # float32 rows: the candidates kept while streaming (at most 2·want), then the float64 working set (2 each)
    use_set = config.solver == "working_set" or (config.solver == "auto" and 4 * want <= budget_rows)
    if not use_set:
        return _solve_pool_full(coefficients, terms, k, total, config, max_iter, tol, search_steps)
    if size is not None and blocks.matrix is None and (
        config.coefficients == "memory"
        or (config.coefficients == "auto" and size * row_bytes + 4 * want * row_bytes <= config.memory_limit_mib * 2**20)
    ):
        blocks.keep_resident(size, num_l)
    dtype = blocks.dtype
    psd = eta == 0.0 or _is_psd(terms.q)
    gram = None if psd else torch.zeros(num_l, num_l, dtype=torch.float64)
    p_l = terms.p.detach().to(torch.float64).reshape(-1)
    p_lc = p_l.to(dtype)
    best = _TopRows(want, num_l)
    ids: list[str] = []
    parts: list[torch.Tensor] = []
    n = 0
    for chunk_ids, start, block in blocks.blocks():
        if not bool(torch.isfinite(block).all()):
            raise NumericalError(f"coefficients rows {start}..{start + block.shape[0]} have non-finite entries")
        b = block.to(dtype)
        pb = (b @ p_lc).double()
        if gram is not None:
            gram += (b.T @ b).double()
        best.offer(pb, torch.arange(start, start + block.shape[0]), block)
        parts.append(pb)
        if chunk_ids is not None:
            ids += chunk_ids
        n = start + block.shape[0]
    if n == 0:
        raise DataError("coefficients have no rows")
    if not 1 <= k <= n:
        raise ConfigError(f"k must be in [1, {n}]; got {k}")
    p_pool = torch.cat(parts)
    core = terms.q.detach().to(torch.float64) * (terms.num_source / n)
    lo = 0.0
    if gram is not None:
        evals_g, evecs_g = torch.linalg.eigh(gram)
        r = evecs_g * evals_g.clamp_min(0).sqrt()
        lo = float(torch.linalg.eigvalsh(r.T @ core @ r).min())
        lo = min(lo, 0.0) if n > num_l else lo
    total = float(n if total is None else total)
    w_index, w_rows = best.result()
    w_rows = w_rows.to(torch.float64)
    member = torch.zeros(n, dtype=torch.bool)
    member[w_index] = True
    rel = 1e-6 if dtype == torch.float32 else 1e-12
    # the first λ search starts at first order's λ for k (the QP without Q): doubling/halving from there skips the
    # ill-conditioned solves near the floor a search from below starts with (measured: ~10x fewer applications)
    lam_hint: float | None = first_order_lambda(p_pool[w_index], k, total)
    w_hint: torch.Tensor | None = project_simplex(p_pool[w_index] / lam_hint, total)
    sol: QPSolution | None = None
    rounds = 0
    while True:
        rounds += 1
        op = _WorkingSetQuadratic(w_rows, core, lo)
        sol = solve_qp(
            p_pool[w_index], op if eta != 0.0 else None, eta, k, total, max_iter=max_iter, tol=tol,
            search_steps=search_steps, lam_hint=lam_hint, w0=w_hint,
        )
        if int(w_index.numel()) == n:
            break
        w_w = sol.weights
        qw = op(w_w) if eta != 0.0 else torch.zeros_like(w_w)
        grad = eta * qw + sol.lam * w_w - p_pool[w_index]
        support = w_w > 0
        nu = float(-grad[support].mean())
        residual = max(
            float((grad[support] + nu).abs().max()),
            float((-grad[~support] - nu).clamp_min(0).max()) if bool((~support).any()) else 0.0,
        )
        scale = max(float(p_pool.abs().max()), abs(nu), eta * float(qw.abs().max()), 1e-300)
        threshold = max(2 * residual, rel * scale)
        u = (core @ (w_rows.T @ w_w)).to(dtype)
        room = (budget_rows - 2 * int(w_index.numel())) // 2  # float64 rows count twice
        violators = _TopRows(min(want, max(room, 0)), num_l)
        found = 0
        for _, start, block in blocks.blocks():
            index = torch.arange(start, start + block.shape[0])
            slack = p_pool[start : start + block.shape[0]] - eta * (block.to(dtype) @ u).double() - nu
            bad = (slack > threshold) & ~member[start : start + block.shape[0]]
            if bool(bad.any()):
                found += int(bad.sum())
                violators.offer(slack[bad], index[bad], block[bad])
        logger.info(
            "pool qp: round %d, %d working rows, lambda=%.6g, %d rows violate optimality", rounds,
            int(w_index.numel()), sol.lam, found,
        )
        if found == 0:
            break
        add_index, add_rows = violators.result()
        if add_index.numel() == 0 or rounds >= config.max_rounds:
            logger.warning(
                "pool qp: the working set cannot grow (%d rows, %d rounds, memory_limit_mib=%d); solving over all rows",
                int(w_index.numel()), rounds, config.memory_limit_mib,
            )
            return _solve_pool_full(coefficients, terms, k, total, config, max_iter, tol, search_steps)
        w_index = torch.cat([w_index, add_index])
        w_rows = torch.cat([w_rows, add_rows.to(torch.float64)])
        member[add_index] = True
        w_hint = torch.cat([w_w, torch.zeros(add_index.numel(), dtype=torch.float64)])
        lam_hint = sol.lam
    weights = torch.zeros(n, dtype=torch.float64)
    weights[w_index] = sol.weights
    solution = QPSolution(weights, sol.lam, sol.num_nonzero, sol.exact, sol.lam_floor)
    final_index, final_rows = w_index, w_rows

    def coefficient_sum(w: torch.Tensor) -> torch.Tensor:
        outside = w.clone()
        outside[final_index] = 0.0
        if not bool(outside.any()):
            return final_rows.T @ w[final_index]
        return blocks.rmatvec(w, n)

    return PoolQPResult(
        solution, p_pool, ids or None, core, "working_set", blocks.passes, rounds,
        int(w_index.numel()), coefficient_sum,
    )


def _solve_pool_full(coefficients, terms, k, total, config, max_iter, tol, search_steps) -> PoolQPResult:
    """:func:`solve_pool_qp` over all rows: :class:`PoolQuadratic` (``C`` in memory or streamed per product)."""
    source = _CountingSource(coefficients) if hasattr(coefficients, "iter_chunks") else coefficients
    p_pool, quad = pool_terms(source, terms, config)
    sol = solve_qp(p_pool, quad, terms.lr, k, total, max_iter=max_iter, tol=tol, search_steps=search_steps)
    passes = source.passes if isinstance(source, _CountingSource) else 0
    return PoolQPResult(
        sol, p_pool, quad.ids, quad.core, "full", passes, 0, quad.n, lambda w: quad.rmatvec(w),
    )
