"""Per-sample loss gradients of landmarks and targets (paper §3, official ``_create_grad_store``).

For each sample: gradient of the MEAN next-token cross-entropy over its supervised tokens (labels
shifted as HF does, ``-100`` ignored) with respect to a parameter subset (default: every ``down_proj``
weight) -> optional random coordinate mask (§3.2) -> ⊙ Adam factor ``a`` (landmarks only, §1.6/§3.4)
-> unit L2 norm -> CountSketch (default), SRHT or Rademacher projection to ``P`` dims (§3.5).

Two exact ways to get per-sample gradients are offered: a batch-1 loop of ordinary backward passes
(default; on CPU it is the fastest and holds one gradient at a time, research/feasibility.md §2) and
``torch.func.vmap(grad(...))`` over chunks of ``batch_size`` rows (holds ``batch_size`` gradients).
Parameters outside the subset get ``requires_grad=False`` during the pass, which skips their
weight-gradient GEMMs; flags are restored afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from idistill_core.data.batch import IGNORE_INDEX, TokenBatch
from idistill_core.errors import ConfigError, NumericalError
from idistill_core.models.architecture import eager_attention
from idistill_core.models.precision import PrecisionResolver
from idistill_core.steps.projection import PROJECTION_REVISION, PROJECTORS, make_projector
from idistill_core.store.hashing import config_fingerprint

__all__ = [
    "GradientConfig",
    "GradientSet",
    "collect_gradients",
    "coordinate_masks",
    "flat_gradients",
    "iter_gradients",
    "mean_token_loss",
    "select_parameters",
]

logger = logging.getLogger("idistill")


class Preconditioner(Protocol):
    """What ``warmup.adam_preconditioner`` returns: per-parameter ``a``, ``b`` and the step's lr (paper §1.6)."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    lr: float


@dataclass(frozen=True)
class GradientConfig:
    """Which gradients are taken and how they are reduced (paper §3; official defaults except P)."""

    param_subset: str = "down_proj"
    """``"all"`` for every parameter, otherwise a regex searched in parameter names (a plain
    substring such as ``"down_proj"`` or ``"o_proj"`` works as is)."""
    max_params: int | None = None
    """Keep at most this many gradient coordinates, a seeded random subset spread over the selected
    tensors in proportion to their sizes (paper §3.2); None keeps all."""
    proj_type: str = "countsketch"
    """``"countsketch"`` (signed CountSketch, O(d), applied tensor by tensor; the default: as faithful as the
    SRHT at 0.26x its cost, BENCHMARKS.md "Paper scale"), ``"srht"`` (block randomized Hadamard, O(d log K)) or
    ``"rademacher"`` (dense, only for small d); see ``projection``."""
    proj_dim: int | None = 8192
    """``P``; None, or a value >= the (masked) gradient size, keeps the raw gradient."""
    normalize: bool = True
    """Scale each (preconditioned, masked) gradient to unit L2 norm before projection."""
    seed: int = 1
    """Seeds the coordinate mask and the projection."""
    batch_size: int = 1
    """1: loop of ordinary backward passes (fastest on CPU); > 1: ``vmap(grad)`` over chunks."""
    dtype: str = "auto"
    """Forward/backward matmul precision: ``float32``, ``bfloat16`` (autocast; fp32 weights and gradients) or
    ``auto``: bfloat16 where native AND a forward+backward probe of the model's MLP block under autocast is
    measured faster (``precision.PrecisionResolver``, workload ``gradients``), else float32. Per machine because
    it goes both ways at batch 1: bf16 autocast measured 2.7x SLOWER on an AMX Xeon and 1.9x faster on a Zen 5
    EPYC (BENCHMARKS.md "Paper scale"). Resolved before fingerprinting, so dtypes never share stored gradients."""
    proj_revision: int = PROJECTION_REVISION
    """Revision of the sketch maps (``projection.PROJECTION_REVISION``); only the current one is implemented. It
    is a field so that gradients sketched by an older map never share a fingerprint with new ones."""

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= 2**32 - 1:
            raise ConfigError(f"GradientConfig.seed must be in [0, 2**32 - 1]; got {self.seed}")
        if not self.param_subset:
            raise ConfigError("GradientConfig.param_subset must be 'all' or a non-empty regex; got ''")
        if self.param_subset != "all":
            try:
                re.compile(self.param_subset)
            except re.error as exc:
                raise ConfigError(
                    f"GradientConfig.param_subset {self.param_subset!r} is not a valid regex ({exc})"
                ) from None
        if self.max_params is not None and self.max_params < 1:
            raise ConfigError(f"GradientConfig.max_params must be >= 1 or None; got {self.max_params}")
        if self.proj_type not in PROJECTORS:
            raise ConfigError(
                f"GradientConfig.proj_type must be one of {', '.join(PROJECTORS)}; got {self.proj_type!r}"
            )
        if self.proj_dim is not None and self.proj_dim < 1:
            raise ConfigError(f"GradientConfig.proj_dim must be >= 1 or None; got {self.proj_dim}")
        if self.batch_size < 1:
            raise ConfigError(f"GradientConfig.batch_size must be >= 1; got {self.batch_size}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"GradientConfig.dtype must be auto, float32 or bfloat16; got {self.dtype!r}")
        if self.proj_revision != PROJECTION_REVISION:
            raise ConfigError(
                f"GradientConfig.proj_revision {self.proj_revision} is not implemented (this code sketches with "
                f"revision {PROJECTION_REVISION}); drop the field to use it"
            )

    def fingerprint(self) -> str:
        return config_fingerprint(self)


@dataclass
class GradientSet:
    """Reduced per-sample gradients. ``grads: (n, P) float32``, row ``i`` belongs to ``sample_ids[i]``."""

    sample_ids: list[str]
    grads: torch.Tensor


def select_parameters(model: nn.Module, subset: str) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters whose gradients are taken.

    Raises:
        ConfigError: the subset matches no parameter (naming it and the model class).
    """
    names = [name for name, _ in model.named_parameters()]
    if subset != "all":
        try:
            pattern = re.compile(subset)
        except re.error as exc:
            raise ConfigError(f"param_subset {subset!r} is not a valid regex ({exc})") from None
        names = [name for name in names if pattern.search(name)]
    if not names:
        raise ConfigError(f"param_subset {subset!r} matches no parameter of {type(model).__name__}")
    return names


def coordinate_masks(
    model: nn.Module, param_names: list[str], max_params: int | None, seed: int
) -> dict[str, torch.Tensor | None]:
    """Seeded random coordinates kept per tensor (paper §3.2), shared by landmarks and targets.

    Tensor ``p`` keeps ``round(max_params * numel(p) / total)`` coordinates (all when that reaches its
    size); ``None`` means "keep everything".

    Returns:
        ``{name: sorted flat indices (long) or None}``.
    """
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in param_names)
    if max_params is None or max_params >= total:
        return {n: None for n in param_names}
    gen = torch.Generator().manual_seed(seed)
    masks: dict[str, torch.Tensor | None] = {}
    for name in param_names:
        numel = params[name].numel()
        quota = round(max_params * numel / total)
        if quota >= numel:
            masks[name] = None
        else:
            masks[name] = torch.randperm(numel, generator=gen)[:quota].sort().values
    return masks


def mean_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised tokens, per row.

    Args:
        logits: ``(B, S, V)``.
        labels: ``(B, S)`` long, ``-100`` where not supervised; position ``t`` predicts ``labels[t+1]``.

    Returns:
        ``(B,)`` losses (NaN for a row without supervised tokens; callers check beforehand).
    """
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # as HF's loss does, so low-precision logits do not bias the loss
    target = labels[:, 1:]
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(target.shape)
    supervised = (target != IGNORE_INDEX).to(per_token.dtype)
    return (per_token * supervised).sum(dim=1) / supervised.sum(dim=1)


def _check_supervised(batch: TokenBatch) -> None:
    counts = (batch.labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    for row in (counts == 0).nonzero().flatten().tolist():
        raise NumericalError(
            f"sample {batch.sample_ids[row]!r}: no supervised token (all shifted labels are -100); "
            "drop it before computing gradients"
        )


@contextlib.contextmanager
def only_grads_for(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Eval mode with ``requires_grad`` only on ``names`` (restored on exit): autograd then keeps no tensor
    for the other weights' gradients, which a graph kept for double backward would otherwise hold."""
    wanted = set(names)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()  # dropout off, as in the official code
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in wanted)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)


def _takes_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _row_loss(model: nn.Module, one: TokenBatch, keep_logits: bool) -> torch.Tensor:
    """The mean supervised-token loss of a one-row batch (``mean_token_loss``). With ``keep_logits`` the LM head
    runs only at the positions whose next token is supervised (transformers' ``logits_to_keep``): the same loss
    and gradient, without the vocabulary-sized head and softmax over prompt tokens (a median 4% of the tokens of
    the real pool are supervised; 1.27x faster per gradient on SmolLM2-135M, BENCHMARKS.md "Paper scale")."""
    if not keep_logits:
        logits = model(input_ids=one.input_ids, attention_mask=one.attention_mask).logits
        return mean_token_loss(logits, one.labels)[0]
    target = one.labels[0, 1:]
    kept = (target != IGNORE_INDEX).nonzero().flatten()
    logits = model(input_ids=one.input_ids, attention_mask=one.attention_mask, logits_to_keep=kept).logits[0]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # as mean_token_loss: low-precision logits do not bias the loss
    return F.cross_entropy(logits, target[kept])


def _loop_grads(model: nn.Module, batch: TokenBatch, names: list[str]) -> dict[str, torch.Tensor]:
    """``{name: (B, *shape)}`` by one ordinary backward per row (rows trimmed to their own length)."""
    params = dict(model.named_parameters())
    targets = [params[n] for n in names]
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    keep_logits = _takes_logits_to_keep(model)
    for row in range(len(batch)):
        one = batch.select([row])
        loss = _row_loss(model, one, keep_logits)
        for name, g in zip(names, torch.autograd.grad(loss, targets), strict=True):
            out[name].append(g.detach())
    return {n: torch.stack(gs) for n, gs in out.items()}


def _vmap_grads(model: nn.Module, batch: TokenBatch, names: list[str]) -> dict[str, torch.Tensor]:
    """``{name: (B, *shape)}`` with ``vmap(grad)``; eager attention (sdpa has no batching rule).

    No attention mask is passed: rows are right-padded and attention is causal, so a real token never
    sees padding, and padding positions carry label -100, so the loss is exactly the unpadded one.
    """
    all_params = dict(model.named_parameters())
    selected = {n: all_params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in all_params.items() if n not in selected}
    frozen.update(dict(model.named_buffers()))

    def loss_fn(params, input_ids, labels):
        logits = functional_call(model, {**frozen, **params}, (input_ids[None],)).logits
        return mean_token_loss(logits, labels[None])[0]

    with eager_attention(model):
        return vmap(grad(loss_fn), in_dims=(None, 0, 0))(selected, batch.input_ids, batch.labels)


def _pieces(grads: dict[str, torch.Tensor], masks: dict[str, torch.Tensor | None]) -> list[torch.Tensor]:
    pieces = []
    for name, g in grads.items():
        flat = g.reshape(g.shape[0], -1)
        mask = masks.get(name)
        pieces.append(flat if mask is None else flat[:, mask.to(flat.device)])
    return pieces


def _flatten(grads: dict[str, torch.Tensor], masks: dict[str, torch.Tensor | None]) -> torch.Tensor:
    return torch.cat(_pieces(grads, masks), dim=1)


def flat_gradients(
    model: nn.Module, batch: TokenBatch, param_names: list[str], batch_size: int = 1
) -> torch.Tensor:
    """Raw per-sample gradients of the mean supervised-token loss, concatenated in ``param_names`` order.

    Args:
        model: a causal LM returning ``.logits``.
        batch: right-padded rows with ``labels``.
        param_names: from ``select_parameters``.
        batch_size: 1 for the backward loop, > 1 for ``vmap(grad)`` over chunks of that size.

    Returns:
        ``(B, d)`` in the model dtype, ``d`` = total size of the named parameters.

    Raises:
        NumericalError: a row without supervised tokens (naming its sample id).
    """
    return _flatten(_per_sample(model, batch, param_names, batch_size), {})


def _per_sample(model: nn.Module, batch: TokenBatch, names: list[str], batch_size: int) -> dict:
    device = next(model.parameters()).device
    batch = batch.to(device)
    _check_supervised(batch)
    with only_grads_for(model, names):
        if batch_size == 1:
            return _loop_grads(model, batch, names)
        chunks = [
            _vmap_grads(model, batch.select(list(range(s, min(s + batch_size, len(batch))))), names)
            for s in range(0, len(batch), batch_size)
        ]
        return {n: torch.cat([c[n] for c in chunks]) for n in names}


class _Reducer:
    """Mask -> ⊙a -> unit norm -> projection, fixed once per pass so landmarks and targets agree."""

    def __init__(self, model, config: GradientConfig, preconditioner: Preconditioner | None):
        self.names = select_parameters(model, config.param_subset)
        self.masks = coordinate_masks(model, self.names, config.max_params, config.seed)
        params = dict(model.named_parameters())
        self.dim = sum(
            params[n].numel() if self.masks[n] is None else int(self.masks[n].numel()) for n in self.names
        )
        self.scale = None
        if preconditioner is not None:
            missing = [n for n in self.names if n not in preconditioner.a]
            if missing:
                raise ConfigError(f"preconditioner has no factor for parameter {missing[0]!r}")
            a = {n: preconditioner.a[n].reshape(1, -1) for n in self.names}
            self.scale = [piece[0] for piece in _pieces(a, self.masks)]
        self.projector = None
        if config.proj_dim is not None and config.proj_dim < self.dim:
            self.projector = make_projector(config.proj_type, self.dim, config.proj_dim, config.seed)
        self.out_dim = self.dim if self.projector is None else config.proj_dim
        self.normalize = config.normalize

    def __call__(self, grads: dict[str, torch.Tensor], sample_ids: list[str]) -> torch.Tensor:
        # Tensor by tensor: the unit norm is linear, so it is applied as one (B, 1) factor at the end, and a
        # per-tensor projector (CountSketch) never needs the concatenated gradient.
        pieces = _pieces(grads, self.masks)
        if self.scale is not None:
            pieces = [p * a.to(device=p.device, dtype=p.dtype) for p, a in zip(pieces, self.scale, strict=True)]
        # float32 accumulation (no float32 copy of a bf16 piece); float64 pieces keep float64. The norms are also
        # the finiteness check: a NaN or inf anywhere makes its row's norm non-finite, and one pass over the
        # gradient is ~0.1 s cheaper per 26.5M coordinates than isfinite (3 passes and a bool copy).
        wide = [torch.linalg.vector_norm(p, dim=1, dtype=torch.promote_types(p.dtype, torch.float32)) for p in pieces]
        row_norms = torch.stack(wide).norm(dim=0)
        suspect = (~torch.isfinite(row_norms)).nonzero().flatten()
        if len(suspect):
            row = int(suspect[0])
            finite = all(bool(torch.isfinite(p[row]).all()) for p in pieces)
            what = "gradient norm overflows float32" if finite else "non-finite gradient"
            raise NumericalError(f"sample {sample_ids[row]!r}: {what}")
        factor = None
        if self.normalize:
            norms = row_norms.float()[:, None]
            zero = (norms[:, 0] == 0).nonzero().flatten()
            if len(zero):
                raise NumericalError(
                    f"sample {sample_ids[int(zero[0])]!r}: zero gradient cannot be normalised"
                )
            factor = 1.0 / norms
        if self.projector is not None:
            return self.projector.project_pieces(pieces, factor)
        flat = torch.cat([p.float() for p in pieces], dim=1)
        return flat if factor is None else flat * factor


def iter_gradients(
    model: nn.Module,
    batches: Iterable[TokenBatch],
    config: GradientConfig = GradientConfig(),
    preconditioner: Preconditioner | None = None,
    progress: bool = False,
    resolver: PrecisionResolver | None = None,
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Stream reduced per-sample gradients, one result per input batch.

    Args:
        model: a causal LM; parameters are not changed, ``requires_grad`` and train mode are restored.
        batches: right-padded ``TokenBatch``es with labels.
        config: see ``GradientConfig``.
        preconditioner: Adam factors (``warmup.adam_preconditioner``) applied as ``g ⊙ a``; pass it
            for LANDMARK (training-pool) gradients only, never for targets (paper §3.4).
        progress: tqdm bar over batches.
        resolver: resolves ``config.dtype == "auto"`` (a fresh one when None).

    Yields:
        ``(sample_ids, grads)`` with ``grads: (B, P) float32`` on CPU.

    Raises:
        ConfigError: bad subset or a preconditioner missing a selected parameter.
        NumericalError: a sample with no supervised token, or a non-finite / zero gradient.
    """
    reducer = _Reducer(model, config, preconditioner)
    decision = (resolver or PrecisionResolver()).resolve_for_model(config.dtype, model, workload="gradients")
    logger.info(
        "gradients: %d tensors, %d coordinates -> %d (%s), %s",
        len(reducer.names),
        reducer.dim,
        reducer.out_dim,
        config.proj_type if reducer.projector is not None else "raw",
        decision.summary(),
    )
    device_type = next(model.parameters()).device.type
    for batch in tqdm(batches, disable=not progress, desc="gradients", unit="batch"):
        # Autocast covers the forward only: weights and gradients stay float32 and the reduction (mask, norm,
        # projection) runs outside it in float32.
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=decision.autocast):
            grads = _per_sample(model, batch, reducer.names, config.batch_size)
        yield list(batch.sample_ids), reducer(grads, batch.sample_ids).cpu()


def collect_gradients(
    model: nn.Module,
    batches: Iterable[TokenBatch],
    config: GradientConfig = GradientConfig(),
    preconditioner: Preconditioner | None = None,
    progress: bool = False,
) -> GradientSet:
    """All of ``iter_gradients`` stacked: ``GradientSet(sample_ids, grads (n, P) float32)``."""
    ids: list[str] = []
    rows: list[torch.Tensor] = []
    for sample_ids, grads in iter_gradients(model, batches, config, preconditioner, progress):
        ids += sample_ids
        rows.append(grads)
    if not rows:
        return GradientSet([], torch.zeros((0, 0)))
    return GradientSet(ids, torch.cat(rows))
