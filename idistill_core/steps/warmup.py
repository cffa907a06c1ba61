"""Warm-up training and the Adam preconditioner (paper §1.6, §6; official ``_read_optim``).

``warmup`` trains the model in place for a few AdamW steps on a small pool subset so that the
optimizer has moment estimates. ``adam_preconditioner`` turns that state into the affine model of the
NEXT AdamW step with the second moment ``v`` frozen:

    θ' = θ - lr · (b + a ⊙ g),
    v̂ = v / (1 - β2^(t+1)),  α1 = β1 / (1 - β1^(t+1)),  α2 = (1 - β1) / (1 - β1^(t+1)),
    a = α2 / (sqrt(v̂) + eps),  b = wd · θ + α1 · m / (sqrt(v̂) + eps),

where ``t`` is the number of steps taken so far. This is exact for ``torch.optim.AdamW`` whenever the
new gradient leaves ``v`` unchanged; in general the real step also folds ``g²`` into ``v`` (a
relative change of order ``(1 - β2) g² / v``), which the paper's reconstruction ignores. Landmark
gradients are multiplied by ``a`` before scoring (first order); ``b`` only matters at second order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from idistill_core.data.batch import IGNORE_INDEX, TokenBatch
from idistill_core.errors import ConfigError, DataError
from idistill_core.steps.gradients import mean_token_loss
from idistill_core.store.hashing import config_fingerprint

__all__ = ["AdamPreconditioner", "WarmupConfig", "adam_preconditioner", "warmup"]

logger = logging.getLogger("idistill")


@dataclass(frozen=True)
class WarmupConfig:
    """A short AdamW run that gives the optimizer state used for preconditioning (paper §6)."""

    steps: int = 20
    """Optimizer steps; the batches are cycled (reshuffled each cycle) when there are fewer."""
    batch_size: int = 8
    """Rows per step; larger incoming batches are split into chunks of this many rows."""
    lr: float = 1e-4
    """AdamW learning rate (constant)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW ``(β1, β2)``."""
    eps: float = 1e-8
    """AdamW epsilon."""
    seed: int = 0
    """Seeds the order of batches within each cycle."""
    max_grad_norm: float | None = 1.0
    """Clip the total gradient norm to this value before each step; None disables clipping."""

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= 2**32 - 1:
            raise ConfigError(f"WarmupConfig.seed must be in [0, 2**32 - 1]; got {self.seed}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"WarmupConfig.weight_decay must be finite and >= 0; got {self.weight_decay}")
        if self.steps < 1:
            raise ConfigError(f"WarmupConfig.steps must be >= 1; got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"WarmupConfig.batch_size must be >= 1; got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"WarmupConfig.lr must be > 0; got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"WarmupConfig.weight_decay must be >= 0; got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"WarmupConfig.betas must be two values in [0, 1); got {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"WarmupConfig.eps must be > 0; got {self.eps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"WarmupConfig.max_grad_norm must be > 0 or None; got {self.max_grad_norm}")

    def fingerprint(self) -> str:
        return config_fingerprint(self)


@dataclass
class AdamPreconditioner:
    """Affine model of the next optimizer step: ``Δθ = -lr · (b + a ⊙ g)`` per parameter.

    Attributes:
        a: ``{name: tensor shaped like the parameter}`` multiplicative factor.
        b: ``{name: tensor shaped like the parameter}`` gradient-independent drift.
        lr: learning rate of the next step (0 without an optimizer).
        step: steps taken so far (``t``).
    """

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    lr: float
    step: int


def _row_groups(batches: Iterable[TokenBatch], batch_size: int) -> list[TokenBatch]:
    groups = []
    for batch in batches:
        for start in range(0, len(batch), batch_size):
            rows = list(range(start, min(start + batch_size, len(batch))))
            groups.append(batch if len(rows) == len(batch) else batch.select(rows))
    return groups


def warmup(
    model: nn.Module,
    batches: Iterable[TokenBatch],
    config: WarmupConfig = WarmupConfig(),
    progress: bool = False,
) -> torch.optim.AdamW:
    """Train ``model`` in place with AdamW on the mean supervised-token cross-entropy.

    Args:
        model: a causal LM returning ``.logits``; parameters with ``requires_grad`` are trained.
        batches: right-padded ``TokenBatch``es (read fully; cycled for ``config.steps`` steps).
        config: see ``WarmupConfig``.
        progress: tqdm bar over steps.

    Returns:
        The optimizer, with its state (``exp_avg``, ``exp_avg_sq``, ``step``) for ``adam_preconditioner``.

    Raises:
        DataError: no batches, or a batch without any supervised token.
    """
    groups = _row_groups(batches, config.batch_size)
    if not groups:
        raise DataError("warmup got no batches; give it at least one tokenized sample")
    for group in groups:
        if not (group.labels[:, 1:] != IGNORE_INDEX).any():
            raise DataError(
                f"warmup batch starting at sample {group.sample_ids[0]!r} has no supervised token"
            )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    device = next(model.parameters()).device
    rng = np.random.default_rng(config.seed)
    order: list[int] = []
    was_training = model.training
    model.train()
    try:
        for step in tqdm(range(config.steps), disable=not progress, desc="warm-up", unit="step"):
            if not order:
                order = rng.permutation(len(groups)).tolist()
            batch = groups[order.pop(0)].to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            # Mean over all supervised tokens of the batch (HF's convention), not a mean of row means.
            targets = batch.labels[:, 1:]
            per_row = mean_token_loss(logits, batch.labels)
            counts = (targets != IGNORE_INDEX).sum(dim=1)
            loss = (per_row.nan_to_num() * counts).sum() / counts.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            if step == 0 or step == config.steps - 1:
                logger.info("warm-up step %d/%d: loss %.4f", step + 1, config.steps, loss.item())
    finally:
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def adam_preconditioner(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, param_names: list[str]
) -> AdamPreconditioner:
    """Read ``a``, ``b`` and ``lr`` of the next step from an optimizer's state (paper §1.6).

    Supported: ``torch.optim.AdamW``; ``torch.optim.Adam`` only with ``weight_decay == 0`` (its
    coupled L2 decay would enter ``m`` and ``v``, which the affine model does not describe) unless it
    uses ``decoupled_weight_decay=True``; ``torch.optim.SGD`` (``a = 1``, ``b = μ·buf + wd·θ``);
    ``None`` (``a = 1``, ``b = 0``, ``lr = 0``). If the current lr is 0 (schedule finished) the
    group's ``initial_lr / 2`` is used, as in the official code.

    Args:
        model: the model the optimizer updates.
        optimizer: the warm-up optimizer, or None.
        param_names: names (``model.named_parameters()``) to read, e.g. from ``select_parameters``.

    Returns:
        ``AdamPreconditioner`` with ``a``/``b`` on the parameters' devices, in their dtypes.

    Raises:
        ConfigError: unsupported optimizer, Adam with coupled weight decay, or a parameter without
            optimizer state.
    """
    params = dict(model.named_parameters())
    missing = [n for n in param_names if n not in params]
    if missing:
        raise ConfigError(f"parameter {missing[0]!r} is not a parameter of {type(model).__name__}")
    if optimizer is None:
        ones = {n: torch.ones_like(params[n]).detach() for n in param_names}
        zeros = {n: torch.zeros_like(params[n]).detach() for n in param_names}
        return AdamPreconditioner(ones, zeros, 0.0, 0)

    kind = type(optimizer)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    lr, step = 0.0, 0
    for name in param_names:
        p = params[name]
        group = group_of.get(id(p))
        state = optimizer.state.get(p, {})
        if group is None or not state:
            raise ConfigError(
                f"optimizer has no state for parameter {name!r}; warm it up or pass optimizer=None"
            )
        lr = group["lr"] if group["lr"] > 0 else group.get("initial_lr", 0.0) / 2
        wd = group.get("weight_decay", 0.0)
        theta = p.detach()
        if kind is torch.optim.SGD:
            a[name] = torch.ones_like(theta)
            buf = state.get("momentum_buffer")
            drift = wd * theta
            b[name] = drift if buf is None else drift + group["momentum"] * buf
            continue
        if kind not in (torch.optim.Adam, torch.optim.AdamW):
            raise ConfigError(f"unsupported optimizer {kind.__name__} for preconditioning; use AdamW or SGD")
        if kind is torch.optim.Adam and wd != 0 and not group.get("decoupled_weight_decay", False):
            raise ConfigError(
                f"torch.optim.Adam with weight_decay={wd} couples decay into the moments; use AdamW"
            )
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        step = int(state["step"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        # Bias corrections of the NEXT step (t + 1), as torch applies them when stepping.
        c1 = 1 - beta1 ** (step + 1)
        c2 = 1 - beta2 ** (step + 1)
        denom = (v / c2).sqrt() + eps
        a[name] = (1 - beta1) / c1 / denom
        b[name] = wd * theta + (beta1 / c1) * state["exp_avg"] / denom
    return AdamPreconditioner(a, b, float(lr), step)
