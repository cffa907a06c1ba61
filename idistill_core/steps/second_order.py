"""Step 3, second order: the quadratic model of the target loss after one weighted step (paper §1.3, §1.6).

Notation (paper §1): ``G`` holds per-sample gradients of the source samples (here the landmarks),
``g_T`` is the gradient of the MEAN target loss ``L_T``, ``H_T`` its Hessian, ``η`` the learning rate.
One weighted step ``θ' = θ − (η/|S|) Gᵀw`` changes the target loss by, to second order,

    ΔL_T ≈ (η/|S|) · (−pᵀw + (η/2) wᵀQw),   p = G g_T,   Q = (1/|S|) G H_T Gᵀ.

For AdamW with frozen second moments the step is ``θ' = θ − η(b + a ⊙ Gᵀw/|S|)`` and (paper §1.6)

    p = G diag(a) (g_T − η H_T b),   Q = (1/|S|) G diag(a) H_T diag(a) Gᵀ,
    plus a w-independent constant  −η g_Tᵀb + (η²/2) bᵀH_T b.

:func:`second_order_terms` builds ``p`` and ``Q`` from raw gradients (the exact reference);
:func:`sketched_second_order_terms` builds the same terms with memory ``O(L · P + d)`` (exact ``p`` and diagonal,
sketched pairs).
The weights then come from the QP in :mod:`idistill_core.steps.qp` (over the pool: :mod:`idistill_core.steps.pool_qp`). Not in the released code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from idistill_core.data.batch import IGNORE_INDEX, TokenBatch
from idistill_core.errors import ConfigError, DataError, NumericalError
from idistill_core.models.architecture import eager_attention
from idistill_core.steps.gradients import Preconditioner, only_grads_for, select_parameters

logger = logging.getLogger("idistill")


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
    q_noise: float = 0.0
    """Relative Frobenius error of ``Q``'s off-diagonal part as two independent sketches estimate it (0: exact)."""

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
    hessian_proj_dim: int | None = None,
) -> SecondOrderTerms:
    """The paper's ``p`` and ``Q`` (the real step, as :func:`second_order_terms`) with memory ``O(L · P + d)``.

    The model is the real one: the step is ``θ' = θ − (η/|S|) Σ_i w_i v_i − η b`` with ``v_i = a ⊙ g_i`` the
    landmark's raw (preconditioned) gradient (``a = 1``, ``b = 0`` for GD) and the target loss is the real mean
    ``L_T``, so ``p_i = v_i · (g_T − η H_T b)``, ``Q_ij = v_iᵀ H_T v_j / |S|`` and the constant is
    ``−η g_Tᵀb + (η²/2) bᵀH_T b``: linear, quadratic and ``b`` terms at the scale of the step ``η`` is the
    learning rate of. With ``proj_dim=None`` (no sketch) the result equals :func:`second_order_terms`.

    What is exact and what is sketched: every landmark's ``v_i`` is in hand once, so ``p_i`` (``v_i·g_T`` and
    ``v_i·H_T b``) and the diagonal ``Q_ii = v_iᵀH_T v_i`` are exact inner products of ``d``-vectors. Only the
    pairs ``Q_ij`` need a sketch: ``v_iᵀ H v_j ≈ n_i n_j (S u_i)·(S H u_j)`` with ``u_i = v_i/n_i``. Two
    independent sketches ``S₁, S₂`` of ``hessian_proj_dim`` rows (default: the gradient config's ``proj_dim``)
    are averaged, which halves the variance, and their disagreement estimates the error that remains
    (``SecondOrderTerms.q_noise``, relative Frobenius error of the off-diagonal part; ~``√(L/P)/√2``).

    Cost: per landmark one backward and one Hessian-vector product through the target graph, which is built
    once and kept: its memory grows with the target samples in it. ``hessian_batches`` (a uniform sample of the
    targets) puts only those in the graph: ``H_T`` is then their mean, an unbiased estimate, while ``g_T`` still
    comes from every target sample.

    Args:
        model: causal LM in eval mode.
        landmark_batches: the source samples, in order.
        target_batches: the target samples.
        config: the ``GradientConfig`` of first order (parameter subset, sketch type, seed); ``max_params``
            must be None (the HVP needs the full direction).
        preconditioner: AdamW ``a``/``b``; None for GD.
        lr: ``η``; defaults to ``preconditioner.lr`` (0 for GD).
        num_source: ``|S|``; defaults to the number of landmarks.
        hessian_batches: the target samples whose Hessian is used; None: all of ``target_batches``.
        on_landmark: called with the number of landmarks done after each one (progress).
        hessian_proj_dim: rows of each of the two ``Q`` sketches; None: ``config.proj_dim``.
    """
    from idistill_core.steps.projection import make_projector

    if config.max_params is not None:
        raise ConfigError("sketched second order needs GradientConfig.max_params=None (HVPs use the full direction)")
    names = select_parameters(model, config.param_subset)
    params = _named_params(model, names)
    dim = sum(p.numel() for p in params)
    width = hessian_proj_dim if hessian_proj_dim is not None else config.proj_dim
    if width is not None and width < 1:
        raise ConfigError(f"hessian_proj_dim must be >= 1 or None; got {width}")
    projectors = [None, None]
    if width is not None and width < dim:
        # seeds apart from first order's sketch: the two Q sketches are independent of it and of each other
        projectors = [make_projector(config.proj_type, dim, width, seed=config.seed + 7919 * (k + 1)) for k in range(2)]

    def sketch(k: int, v: torch.Tensor) -> torch.Tensor:
        v = v.detach().float()[None]
        return (v if projectors[k] is None else projectors[k].project(v))[0]

    eta, a, b = _step_terms(preconditioner, names, params, lr)

    def gradient_sum(batches: Iterable[TokenBatch], graph: bool, what: str):
        """``Σ_t g_t`` over the samples of ``batches`` (kept differentiable when ``graph``), count, loss sum."""
        total, count, loss_sum = None, 0, 0.0
        for batch in batches:
            losses = sample_losses(model, batch)
            g = torch.autograd.grad(losses.sum(), params, create_graph=graph)
            if not bool(torch.isfinite(_flat(x.detach() for x in g)).all()):
                raise NumericalError(f"a target sample of {batch.sample_ids} has a non-finite gradient")
            total = list(g) if total is None else [s + x for s, x in zip(total, g)]
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
            g_graph, num_hessian, loss_sum = gradient_sum(target_batches, True, "target_batches")
            g_all, num_targets = [x.detach() for x in g_graph], num_hessian
        else:
            g_all, num_targets, loss_sum = gradient_sum(target_batches, False, "target_batches")
            g_graph, num_hessian, _ = gradient_sum(hessian_batches, True, "hessian_batches")

        def hvp(v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            """``H_T v``, flattened into ``out`` when given (``v`` itself is allowed: autograd is done with it)."""
            hv = torch.autograd.grad(g_graph, params, grad_outputs=_split_like(v, params), retain_graph=True)
            flat = torch.cat([x.reshape(-1) for x in hv], out=out) if out is not None else _flat(hv)
            return flat.div_(num_hessian)

        g_t = _flat(g_all).div_(num_targets)
        del g_all
        h_b = hvp(b) if b is not None else None  # one HVP serves every landmark's b term and bᵀHb
        norms, p_first, u_h_b, diag = [], [], [], []
        s_u: list[list[torch.Tensor]] = [[], []]
        s_hu: list[list[torch.Tensor]] = [[], []]
        for batch in landmark_batches:
            for v in per_sample_flat_gradients(model, batch, names):  # rows of a fresh tensor: scaled in place
                if a is not None:
                    v.mul_(a)
                norm = v.norm()
                if float(norm) == 0.0 or not math.isfinite(float(norm)):
                    raise NumericalError("a landmark has a zero or non-finite (preconditioned) gradient")
                u = v.div_(norm)
                norms.append(float(norm))
                p_first.append(float(u @ g_t))
                u_h_b.append(float(u @ h_b) if h_b is not None else 0.0)
                for k in range(2):
                    s_u[k].append(sketch(k, u))
                hu = hvp(u)
                diag.append(float(u @ hu))
                for k in range(2):
                    s_hu[k].append(sketch(k, hu))
                del u, v, hu
                if on_landmark is not None:
                    on_landmark(len(norms))
        if not norms:
            raise DataError("landmark_batches is empty")
        g_b = float(g_t @ b) if b is not None else 0.0
        b_h_b = float(b @ h_b) if b is not None else 0.0

    n = torch.tensor(norms, dtype=torch.float64)
    n_land = n.numel()
    n_src = n_land if num_source is None else num_source
    if n_src <= 0:
        raise ConfigError(f"num_source must be >= 1; got {n_src}")
    sketches = []
    for k in range(2):
        su, shu = torch.stack(s_u[k]).double(), torch.stack(s_hu[k]).double()
        q_unit = su @ shu.T
        sketches.append(0.5 * (q_unit + q_unit.T))
    q_unit = 0.5 * (sketches[0] + sketches[1])
    q_unit.diagonal().copy_(torch.tensor(diag, dtype=torch.float64))
    off = ~torch.eye(n_land, dtype=torch.bool)
    scale = float(q_unit[off].norm()) if n_land > 1 else 0.0
    q_noise = float((sketches[0] - sketches[1])[off].norm()) / (2 * scale) if scale > 0 else 0.0
    q = n[:, None] * q_unit * n[None, :] / n_src
    p_first_t = n * torch.tensor(p_first, dtype=torch.float64)
    if b is None:
        p, constant, constant_first = p_first_t, 0.0, 0.0
    else:
        p = p_first_t - eta * n * torch.tensor(u_h_b, dtype=torch.float64)
        constant_first = -eta * g_b
        constant = constant_first + 0.5 * eta**2 * b_h_b
    if not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(q).all())):
        raise NumericalError("second-order terms p/Q are not finite")
    if q_noise > 0.5:
        logger.warning(
            "second order: the sketched Q's pairs are noisy (relative error ~%.2f from two independent sketches "
            "of %s rows); raise hessian_proj_dim", q_noise, width,
        )
    return SecondOrderTerms(
        p=p, q=q, lr=float(eta), num_source=n_src, constant=float(constant), p_first=p_first_t,
        constant_first=float(constant_first), target_loss=loss_sum / num_targets, q_noise=q_noise,
    )
