"""Step 3: landmark influence, first and second order, and the weight QP (paper §1.3–1.6).

Notation (paper §1): ``G`` holds per-sample gradients of the source samples (here the landmarks),
``g_T`` is the gradient of the MEAN target loss ``L_T``, ``H_T`` its Hessian, ``η`` the learning rate.
One weighted step ``θ' = θ − (η/|S|) Gᵀw`` changes the target loss by, to second order,

    ΔL_T ≈ (η/|S|) · (−pᵀw + (η/2) wᵀQw),   p = G g_T,   Q = (1/|S|) G H_T Gᵀ.

For AdamW with frozen second moments the step is ``θ' = θ − η(b + a ⊙ Gᵀw/|S|)`` and (paper §1.6)

    p = G diag(a) (g_T − η H_T b),   Q = (1/|S|) G diag(a) H_T diag(a) Gᵀ,
    plus a w-independent constant  −η g_Tᵀb + (η²/2) bᵀH_T b.

The weights solve  min −pᵀw + ½wᵀ(ηQ + λI)w  s.t.  w ≥ 0, Σw = total  (paper §1.4), with λ
binary-searched so that exactly ``k`` weights are non-zero.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from idistill_core.architecture import eager_attention
from idistill_core.batch import IGNORE_INDEX, TokenBatch
from idistill_core.errors import ConfigError, DataError, NumericalError

logger = logging.getLogger("idistill")

QApply = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# First order
# --------------------------------------------------------------------------------------------------


def first_order(landmark_grads: torch.Tensor, target_grads: torch.Tensor) -> torch.Tensor:
    """Per-target landmark influences ``P_L = G_L G_Tᵀ`` (paper §4.3).

    Args:
        landmark_grads: ``(L, P)`` projected landmark gradients (Adam-preconditioned if used).
        target_grads: ``(T, P)`` projected target gradients.

    Returns:
        ``(L, T)``; with unit-normalised gradients entry ``(j, i)`` is a cosine similarity.
    """
    _check_grads(landmark_grads, target_grads)
    return landmark_grads @ target_grads.T


def center_gradients(grads: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``(g − μ) / ‖g − μ‖`` row-wise (a row equal to ``μ`` stays zero): the shared component removed.

    Optional (``SelectionRecipe.center``), not the paper's objective: the component all gradients share is part
    of the true first-order loss change; removing it ranks by what is specific to the target (docs/DESIGN.md).

    Args:
        grads: ``(n, P)`` unit-normalised gradients.
        mean: ``(P,)`` the mean gradient to remove (the landmarks' for ID, the pool's for ``exact``).
    """
    centred = grads - mean.to(grads.dtype)[None, :]
    return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)


def aggregated_first_order(landmark_grads: torch.Tensor, target_grads: torch.Tensor) -> torch.Tensor:
    """Influence on the mean target loss, ``p = G_L ḡ_T`` (paper §1.3).

    ``ḡ_T`` is the mean of the target gradient rows. With raw gradients that is exactly the gradient of
    the mean target loss. With unit-normalised gradients (the official code's choice) it is the mean of
    the unit directions, so ``p`` equals the row mean of ``first_order(...)`` — every target sample gets
    an equal share regardless of its gradient norm (paper §12, items 1–2).

    Args:
        landmark_grads: ``(L, P)``.
        target_grads: ``(T, P)``.

    Returns:
        ``(L,)``.
    """
    _check_grads(landmark_grads, target_grads)
    return landmark_grads @ target_grads.mean(dim=0)


def _check_grads(landmark_grads: torch.Tensor, target_grads: torch.Tensor) -> None:
    if landmark_grads.ndim != 2 or target_grads.ndim != 2:
        raise DataError(
            f"landmark_grads and target_grads must be 2-D; got shapes {tuple(landmark_grads.shape)} "
            f"and {tuple(target_grads.shape)}"
        )
    if landmark_grads.shape[1] != target_grads.shape[1]:
        raise DataError(
            f"landmark_grads has P={landmark_grads.shape[1]} but target_grads has P={target_grads.shape[1]}; "
            "both must use the same projection"
        )


# --------------------------------------------------------------------------------------------------
# Second order (not in the released code; paper §1.3 and §1.6)
# --------------------------------------------------------------------------------------------------


class Preconditioner(Protocol):
    """What ``warmup.adam_preconditioner`` returns: per-parameter ``a``, ``b`` and the step's lr."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    lr: float


@dataclass
class SecondOrderTerms:
    """The quadratic model of the target loss after one weighted step over ``num_source`` samples.

    Attributes:
        p: ``(L,)`` linear term (GD: ``G g_T``; AdamW: ``G diag(a)(g_T − η H_T b)``).
        q: ``(L, L)`` ``(1/num_source) U H_T Uᵀ`` with ``U = G`` (GD) or ``G diag(a)`` (AdamW).
        lr: the ``η`` the terms were built for (enters ``p`` only for AdamW, through ``b``).
        num_source: ``|S|`` in the step ``θ' = θ − (η/|S|) Gᵀw``.
        constant: the w-independent change ``−η g_Tᵀb + (η²/2) bᵀH_T b`` (0 for GD).
        p_first: ``(L,)`` the first-order linear term ``U g_T`` (equals ``p`` for GD).
        constant_first: the first-order part of ``constant``, ``−η g_Tᵀb``.
        target_loss: the mean target loss at the current parameters.
    """

    p: torch.Tensor
    q: torch.Tensor
    lr: float
    num_source: int
    constant: float = 0.0
    p_first: torch.Tensor | None = None
    constant_first: float = 0.0
    target_loss: float = float("nan")

    def predicted_change(self, weights: torch.Tensor, lr: float | None = None) -> float:
        """Second-order prediction of ``L_T(θ') − L_T(θ)`` for source weights ``weights`` ``(L,)``.

        ``lr`` may differ from ``self.lr`` only for plain GD (for AdamW ``p`` depends on η).
        """
        eta = self.lr if lr is None else lr
        w = weights.to(self.p.dtype)
        scale = eta / self.num_source
        return float(self.constant + scale * (-(self.p @ w) + 0.5 * eta * (w @ (self.q @ w))))

    def predicted_change_first_order(self, weights: torch.Tensor, lr: float | None = None) -> float:
        """The first-order model alone, ``−η g_Tᵀb − (η/|S|) (U g_T)ᵀw``."""
        eta = self.lr if lr is None else lr
        p1 = self.p if self.p_first is None else self.p_first
        return float(self.constant_first - (eta / self.num_source) * (p1 @ weights.to(p1.dtype)))


def sample_losses(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Per-sample mean next-token cross-entropy over supervised tokens (the HF loss, one row at a time).

    Args:
        model: a causal LM returning ``.logits`` ``(B, S, V)``.
        batch: right-padded ``TokenBatch``.

    Returns:
        ``(B,)`` losses, differentiable w.r.t. the model parameters.

    Raises:
        DataError: a row has no supervised token (its gradient would be zero and its norm NaN).
    """
    device = next(model.parameters()).device
    batch = batch.to(device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.labels[:, 1:]
    token_loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counts = (labels != IGNORE_INDEX).sum(dim=1)
    if bool((counts == 0).any()):
        bad = batch.sample_ids[int((counts == 0).nonzero()[0])]
        raise DataError(f"sample '{bad}' has no supervised token; drop it before computing influence")
    return token_loss.sum(dim=1) / counts.to(token_loss.dtype)


def _named_params(model: torch.nn.Module, param_names: Sequence[str]) -> list[torch.nn.Parameter]:
    if not param_names:
        raise ConfigError("param_names must name at least one parameter; got an empty list")
    named = dict(model.named_parameters())
    missing = [n for n in param_names if n not in named]
    if missing:
        raise ConfigError(f"param_names: model has no parameter '{missing[0]}'")
    return [named[n] for n in param_names]


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split_like(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].view_as(p))
        start += p.numel()
    return out


def per_sample_flat_gradients(
    model: torch.nn.Module, batch: TokenBatch, param_names: Sequence[str]
) -> torch.Tensor:
    """Raw per-sample gradients of the selected parameters, flattened in ``param_names`` order.

    Args:
        model: causal LM.
        batch: ``B`` samples.
        param_names: names from ``model.named_parameters()``.

    Returns:
        ``(B, d)`` with ``d`` the total size of the selected parameters, in the parameter dtype.

    Raises:
        NumericalError: a gradient is not finite (names the sample id).
    """
    params = _named_params(model, param_names)
    losses = sample_losses(model, batch)
    rows = []
    for i in range(len(batch)):
        grads = torch.autograd.grad(losses[i], params, retain_graph=i + 1 < len(batch), allow_unused=True)
        flat = _flat(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params))
        if not bool(torch.isfinite(flat).all()):
            raise NumericalError(f"non-finite gradient for sample '{batch.sample_ids[i]}'")
        rows.append(flat)
    return torch.stack(rows)


def _step_terms(preconditioner, names, params, lr):
    """``(η, a, b)`` of the step the second-order model predicts: the Adam factors flattened over ``names``
    (None for plain GD) and the learning rate (the preconditioner's unless ``lr`` is given)."""
    if preconditioner is not None:
        eta = preconditioner.lr if lr is None else lr
        missing = [n for n in names if n not in preconditioner.a or n not in preconditioner.b]
        if missing:
            raise ConfigError(f"preconditioner has no a/b entry for parameter '{missing[0]}'")
        a = _flat(preconditioner.a[n].to(params[0]) for n in names)
        b = _flat(preconditioner.b[n].to(params[0]) for n in names)
    else:
        eta = 0.0 if lr is None else lr
        a = b = None
    if eta < 0 or not math.isfinite(eta):
        raise ConfigError(f"lr must be finite and >= 0; got {eta}")
    return eta, a, b


def second_order_terms(
    model: torch.nn.Module,
    landmark_batches: Iterable[TokenBatch],
    target_batches: Iterable[TokenBatch],
    param_names: Sequence[str],
    preconditioner: Preconditioner | None = None,
    lr: float | None = None,
    num_source: int | None = None,
) -> SecondOrderTerms:
    """``p`` and ``Q`` for the landmarks via Hessian-vector products of the mean target loss.

    Gradients are raw (no projection, no normalisation): the quadratic model must match the real step.
    Memory is ``O((L + 3) · d)`` for ``d`` selected parameters, so use a parameter subset (e.g.
    ``down_proj``). Cost: one backward per landmark plus, per target batch, one double-backward graph and
    ``L`` (+1 for AdamW) HVPs through it. Runs under eager attention (sdpa/flash kernels have no
    double-backward rule on CPU); the model's attention setting is restored afterwards.

    Args:
        model: causal LM (put it in eval mode: dropout would make H_T random).
        landmark_batches: the source samples ``S`` (the landmarks), in order.
        target_batches: the target samples; ``L_T`` is the mean of their per-sample losses.
        param_names: the parameters the step updates.
        preconditioner: AdamW ``a``/``b`` (frozen-v, paper §1.6); ``None`` for plain GD.
        lr: ``η``; defaults to ``preconditioner.lr``. Needed only with a preconditioner.
        num_source: ``|S|`` in the step; defaults to the number of landmarks.

    Returns:
        ``SecondOrderTerms`` with ``p (L,)`` and ``q (L, L)`` in the parameter dtype.
    """
    params = _named_params(model, param_names)
    eta, a, b = _step_terms(preconditioner, param_names, params, lr)

    with torch.enable_grad(), eager_attention(model):
        grads = [per_sample_flat_gradients(model, batch, param_names) for batch in landmark_batches]
        if not grads:
            raise DataError("landmark_batches is empty")
        # One (L [+1], d) buffer: the landmark directions, then b as an extra probe row for AdamW.
        probes = torch.cat(grads if b is None else [*grads, b[None]])
        del grads
        directions = probes if b is None else probes[:-1]
        if a is not None:
            directions.mul_(a)

        # L_T is linear in the per-sample losses, so sums over target batches divided by T at the end
        # give its gradient and Hessian-vector products without holding all targets at once. Each HVP is
        # reduced against all probes at once, so only the (L+1, L+1) Gram of probeᵀ H probe is kept.
        g_sum = torch.zeros_like(probes[0])
        gram = torch.zeros(probes.shape[0], probes.shape[0], dtype=probes.dtype, device=probes.device)
        loss_sum, num_targets = 0.0, 0
        for batch in target_batches:
            losses = sample_losses(model, batch)
            total = losses.sum()
            g = torch.autograd.grad(total, params, create_graph=True)
            g_sum += _flat(x.detach() for x in g)
            for j in range(probes.shape[0]):
                hv = torch.autograd.grad(
                    g, params, grad_outputs=_split_like(probes[j], params), retain_graph=True
                )
                gram[:, j] += probes @ _flat(hv)
            loss_sum += float(total.detach())
            num_targets += len(batch)
            del g, total, losses
    if num_targets == 0:
        raise DataError("target_batches is empty")

    g_t = g_sum / num_targets
    gram = gram / num_targets
    n_land = directions.shape[0]
    n_src = n_land if num_source is None else num_source
    if n_src <= 0:
        raise ConfigError(f"num_source must be >= 1; got {n_src}")
    q = gram[:n_land, :n_land] / n_src
    q = 0.5 * (q + q.T)  # exact symmetry; HVPs are symmetric only up to rounding
    p_first = directions @ g_t
    if b is None:
        p, constant, constant_first = p_first, 0.0, 0.0
    else:
        # uᵢᵀ H b is read from the b column; averaging with the b row cancels rounding asymmetry.
        u_h_b = 0.5 * (gram[:n_land, n_land] + gram[n_land, :n_land])
        p = p_first - eta * u_h_b
        constant_first = float(-eta * (g_t @ b))
        constant = constant_first + float(0.5 * eta**2 * gram[n_land, n_land])
    if not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(q).all())):
        raise NumericalError("second-order terms p/Q are not finite")
    return SecondOrderTerms(
        p=p.detach(),
        q=q.detach(),
        lr=float(eta),
        num_source=n_src,
        constant=constant,
        p_first=p_first.detach(),
        constant_first=constant_first,
        target_loss=loss_sum / num_targets,
    )


def second_order_q(
    model: torch.nn.Module,
    landmark_batches: Iterable[TokenBatch],
    target_batches: Iterable[TokenBatch],
    param_names: Sequence[str],
    preconditioner: Preconditioner | None = None,
) -> torch.Tensor:
    """``Q (L, L)`` alone (DESIGN contract); see ``second_order_terms``."""
    return second_order_terms(model, landmark_batches, target_batches, param_names, preconditioner).q


# --------------------------------------------------------------------------------------------------
# Landmarks -> pool
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The QP
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Sketched second order: the same normalisation and projection as first order, memory O(L · P)
# --------------------------------------------------------------------------------------------------


def sketched_second_order_terms(
    model: torch.nn.Module,
    landmark_batches: Iterable[TokenBatch],
    target_batches: Iterable[TokenBatch],
    config,
    preconditioner: Preconditioner | None = None,
    lr: float | None = None,
    num_source: int | None = None,
    hessian_batches: Iterable[TokenBatch] | None = None,
    on_landmark: Callable[[int], None] | None = None,
) -> SecondOrderTerms:
    """``p`` and ``Q`` of the quadratic model in first order's space, from projected probes only.

    First order scores ``(S u_i)·(S ĝ_T)`` with ``u_i = a ⊙ g_i / ‖a ⊙ g_i‖`` (``a = 1`` for GD) and ``ĝ_T`` the
    mean of the unit target gradients ``g_t/‖g_t‖``, ``S`` the gradient projection (``GradientConfig``). Here
    the step is taken along those same directions and the target loss is the matching normalised mean
    ``L̂_T = (1/T) Σ_t ℓ_t / ‖g_t‖`` (norms held fixed at θ), whose gradient is ``ĝ_T`` and Hessian
    ``Ĥ_T = (1/T) Σ_t H_t / ‖g_t‖``. Every bilinear form is read through the sketch:

        uᵢᵀ Ĥ uⱼ ≈ (S uᵢ)·(S Ĥ uⱼ),   uᵢᵀ ĝ_T ≈ (S uᵢ)·(S ĝ_T),   uᵢᵀ Ĥ b ≈ (S uᵢ)·(S Ĥ b)   (AdamW),

    so only ``S u_i`` and ``S Ĥ u_i`` (``P`` floats each) are kept: memory ``O(L · P + d)`` instead of
    ``O(L · d)``. With ``η → 0``, ``p`` is exactly first order's landmark value (same ``u_i``, same ``S``), so
    the QP selection tends to the first-order one. The sketch is unbiased for each form (JL); its error
    shrinks like ``1/√P`` and vanishes when ``S`` is the identity (``proj_dim=None``).

    Cost: per landmark one backward and one Hessian-vector product through the target graph, which is built
    once and kept: its memory grows with the target samples in it. ``hessian_batches`` (a uniform sample of the
    targets) puts only those in the graph: ``Ĥ`` is then their mean ``(1/T_h) Σ_{t∈H} H_t / ‖g_t‖``, an unbiased
    estimate, while ``ĝ_T`` (and so ``p`` at ``η = 0``) still comes from every target sample.

    Args:
        model: causal LM in eval mode.
        landmark_batches: the source samples, in order.
        target_batches: the target samples.
        config: the ``GradientConfig`` of first order (parameter subset, projection, seed); ``max_params``
            must be None (the HVP needs the full direction).
        preconditioner: AdamW ``a``/``b``; None for GD.
        lr: ``η``; defaults to ``preconditioner.lr`` (0 for GD).
        num_source: ``|S|``; defaults to the number of landmarks.
        hessian_batches: the target samples whose Hessian is used; None: all of ``target_batches``.
        on_landmark: called with the number of landmarks done after each one (progress).
    """
    from idistill_core.gradients import only_grads_for, select_parameters
    from idistill_core.projection import RademacherProjector, SRHTProjector

    if config.max_params is not None:
        raise ConfigError("sketched second order needs GradientConfig.max_params=None (HVPs use the full direction)")
    names = select_parameters(model, config.param_subset)
    params = _named_params(model, names)
    dim = sum(p.numel() for p in params)
    projector = None
    if config.proj_dim is not None and config.proj_dim < dim:
        cls = SRHTProjector if config.proj_type == "srht" else RademacherProjector
        projector = cls(dim, config.proj_dim, seed=config.seed)

    def sketch(v: torch.Tensor) -> torch.Tensor:
        v = v.detach().float()[None]
        return (v if projector is None else projector.project(v))[0].double()

    eta, a, b = _step_terms(preconditioner, names, params, lr)

    def unit_gradient_sum(batches: Iterable[TokenBatch], graph: bool, what: str):
        """``Σ_t g_t / ‖g_t‖`` over the samples of ``batches`` (kept differentiable when ``graph``), their
        count and loss sum."""
        total, count, loss_sum = None, 0, 0.0
        for batch in batches:
            losses = sample_losses(model, batch)
            for i in range(len(batch)):
                g = torch.autograd.grad(losses[i], params, create_graph=graph, retain_graph=graph or i + 1 < len(batch))
                norm = _flat(x.detach() for x in g).norm()
                if float(norm) == 0.0 or not math.isfinite(float(norm)):
                    raise NumericalError(f"target sample '{batch.sample_ids[i]}' has a zero or non-finite gradient")
                scaled = [x / norm for x in g]
                total = scaled if total is None else [s + x for s, x in zip(total, scaled)]
            loss_sum += float(losses.detach().sum())
            count += len(batch)
        if count == 0:
            raise DataError(f"{what} is empty")
        return total, count, loss_sum

    # only the chosen parameters require grad while the target graph lives: ~0.15 GiB less per target sample
    # on SmolLM2-135M (its peak RSS sets the second order's memory; benchmarks/second_order_memory.py)
    with torch.enable_grad(), eager_attention(model), only_grads_for(model, names):
        # the Hessian's samples keep their graph (double backward); the gradient term uses every target sample
        if hessian_batches is None:
            g_graph, num_hessian, loss_sum = unit_gradient_sum(target_batches, True, "target_batches")
            g_all, num_targets = [x.detach() for x in g_graph], num_hessian
        else:
            g_all, num_targets, loss_sum = unit_gradient_sum(target_batches, False, "target_batches")
            g_graph, num_hessian, _ = unit_gradient_sum(hessian_batches, True, "hessian_batches")

        def hvp(v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            """``Ĥ v``, flattened into ``out`` when given (``v`` itself is allowed: autograd is done with it)."""
            hv = torch.autograd.grad(g_graph, params, grad_outputs=_split_like(v, params), retain_graph=True)
            flat = torch.cat([x.reshape(-1) for x in hv], out=out) if out is not None else _flat(hv)
            return flat.div_(num_hessian)

        g_mean = _flat(g_all) / num_targets
        s_g = sketch(g_mean)
        g_b = float(g_mean @ b) if b is not None else 0.0
        del g_all, g_mean  # not held through the landmark loop (one d-vector less at its peak)
        s_u, s_hu = [], []
        for batch in landmark_batches:
            for u in per_sample_flat_gradients(model, batch, names):  # rows of a fresh tensor: scaled in place
                if a is not None:
                    u.mul_(a)
                norm = u.norm()
                if float(norm) == 0.0:
                    raise NumericalError("a landmark has a zero (preconditioned) gradient; cannot normalise")
                u.div_(norm)
                s_u.append(sketch(u))
                s_hu.append(sketch(hvp(u, out=u)))  # Ĥu over u: one d-vector fewer while sketching
                del u
                if on_landmark is not None:
                    on_landmark(len(s_u))
        if not s_u:
            raise DataError("landmark_batches is empty")
        s_hb, b_h_b = None, 0.0
        if b is not None:
            h_b = hvp(b)  # one HVP serves both forms
            s_hb, b_h_b = sketch(h_b), float(b @ h_b)
            del h_b

    su, shu = torch.stack(s_u), torch.stack(s_hu)
    n_land = su.shape[0]
    n_src = n_land if num_source is None else num_source
    if n_src <= 0:
        raise ConfigError(f"num_source must be >= 1; got {n_src}")
    q = su @ shu.T / n_src
    q = 0.5 * (q + q.T)
    p_first = su @ s_g
    if b is None:
        p, constant, constant_first = p_first, 0.0, 0.0
    else:
        p = p_first - eta * (su @ s_hb)
        constant_first = -eta * g_b
        constant = constant_first + 0.5 * eta**2 * b_h_b
    if not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(q).all())):
        raise NumericalError("second-order terms p/Q are not finite")
    return SecondOrderTerms(
        p=p, q=q, lr=float(eta), num_source=n_src, constant=float(constant), p_first=p_first,
        constant_first=float(constant_first), target_loss=loss_sum / num_targets,
    )
