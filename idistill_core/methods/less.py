"""LESS (Xia et al., ICML 2024, arXiv 2402.04333; princeton-nlp/LESS) as its paper and code define it.

1. :func:`lora_warmup` — LoRA (peft) on a seeded random ``warmup_fraction`` of the pool for ``epochs`` epochs with
   AdamW and a linear schedule with warm-up, keeping one :class:`LessCheckpoint` per epoch (LoRA weights, Adam
   ``exp_avg``/``exp_avg_sq``, step, the epoch's mean learning rate).
2. :func:`adam_features` — per checkpoint ``c``, the training-sample feature is the Adam update direction
   ``Γ_c(z) = m' / sqrt(v' + ε)``, ``m' = β1 m_c + (1 - β1) g``, ``v' = β2 v_c + (1 - β2) g²`` with ``g`` the sample's
   LoRA gradient: exactly ``obtain_gradients_with_adam`` of ``less/data_selection/collect_grad_reps.py`` (no bias
   correction and ε inside the root, as that code does; the paper's formula writes bias-corrected moments).
   Target features are plain (SGD) LoRA gradients. Both are Rademacher-projected with ONE seeded projector, then
   L2-normalised (``merge_and_normalize_info``).
3. :func:`less_select` — ``score(z) = max_subtask mean_{t ∈ subtask} Σ_c η̄_c cos(Γ_c(z), ∇ℓ_c(t))``
   (``matching.py``: checkpoint weights are the mean learning rates, unnormalised), then the top-k.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from idistill_core.data.batch import IGNORE_INDEX, TokenBatch, batches_for, in_order, iter_batches, pad_id
from idistill_core.errors import ConfigError, DataError, NumericalError
from idistill_core.methods.base import SelectionContext, SelectionReport
from idistill_core.pipeline.selection import SelectionOutcome, cap_options, check_budget, uniform_weights
from idistill_core.steps.gradients import _per_sample, mean_token_loss
from idistill_core.steps.projection import PROJECTORS, make_projector
from idistill_core.steps.select import Selection
from idistill_core.store.hashing import config_fingerprint

logger = logging.getLogger("idistill")


@dataclass(frozen=True)
class LessConfig:
    """LESS's knobs; defaults are the authors' (``warmup_lora_train.sh``, ``get_info.py``) unless noted."""

    # --- warm-up (step 1) ---
    warmup_fraction: float = 0.05
    """Share of the pool (seeded random) the LoRA warm-up trains on; at least one sample."""
    epochs: int = 4
    """Warm-up epochs; one checkpoint per epoch, all of them used for scoring."""
    lora_rank: int = 128
    """LoRA rank r (authors: 128)."""
    lora_alpha: float | None = None
    """LoRA α; None = 4·r (authors: 512 for r = 128)."""
    lora_dropout: float = 0.1
    """LoRA dropout during the warm-up (off while features are taken, as the model is in eval mode)."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Modules that get adapters (authors: the attention projections)."""
    lr: float = 2e-5
    """Peak AdamW learning rate (authors: 2e-5)."""
    warmup_ratio: float = 0.03
    """Linear lr warm-up over ceil(ratio · total steps), then linear decay to 0 (HF's linear schedule)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (authors: 0)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (β1, β2); also the moment update of the feature (the authors hard-code 0.9, 0.999)."""
    eps: float = 1e-8
    """AdamW ε; also the ε of the feature."""
    batch_size: int = 32
    """Samples per optimizer step (authors: 1 per device × 32 accumulation; loss = mean of per-sample losses)."""
    max_grad_norm: float | None = 1.0
    """Gradient-norm clip per step (HF Trainer default, which the authors keep); None disables it."""
    # --- features and scores (steps 2-3) ---
    proj_dim: int = 8192
    """d of the random projection (authors: 8192)."""
    proj_type: str = "rademacher"
    """``rademacher`` is the authors' (TRAK); ``srht``/``countsketch`` are faster stand-ins for large LoRA sizes."""
    seed: int = 0
    """Seeds the warm-up subset, LoRA init, dropout, batch order and the projection."""

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= 2**32 - 1:
            raise ConfigError(f"LessConfig.seed must be in [0, 2**32 - 1]; got {self.seed}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"LessConfig.weight_decay must be finite and >= 0; got {self.weight_decay}")
        if not 0 < self.warmup_fraction <= 1:
            raise ConfigError(f"LessConfig.warmup_fraction must be in (0, 1]; got {self.warmup_fraction}")
        for name in ("epochs", "lora_rank", "batch_size", "proj_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"LessConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"LessConfig.lora_alpha must be > 0 or None; got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"LessConfig.lora_dropout must be in [0, 1); got {self.lora_dropout}")
        if not self.target_modules:
            raise ConfigError("LessConfig.target_modules must name at least one module")
        if not self.lr > 0:
            raise ConfigError(f"LessConfig.lr must be > 0; got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"LessConfig.warmup_ratio must be in [0, 1); got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"LessConfig.weight_decay must be >= 0; got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"LessConfig.betas must be two values in [0, 1); got {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"LessConfig.eps must be > 0; got {self.eps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"LessConfig.max_grad_norm must be > 0 or None; got {self.max_grad_norm}")
        if self.proj_type not in PROJECTORS:
            raise ConfigError(f"LessConfig.proj_type must be one of {', '.join(PROJECTORS)}; got {self.proj_type!r}")

    def fingerprint(self) -> str:
        return config_fingerprint(self)


@dataclass
class LessCheckpoint:
    """The state saved at the end of one warm-up epoch (the authors' ``checkpoint-*`` with ``optimizer.bin``)."""

    epoch: int
    lora: dict[str, torch.Tensor]
    """LoRA parameter values, keyed by ``named_parameters`` name of the peft model."""
    exp_avg: dict[str, torch.Tensor]
    """AdamW first moments ``m_c``."""
    exp_avg_sq: dict[str, torch.Tensor]
    """AdamW second moments ``v_c``."""
    step: int
    """Optimizer steps taken so far."""
    mean_lr: float
    """Mean learning rate of this epoch's steps: the checkpoint's weight η̄_c."""


@dataclass
class LessWarmup:
    """The warmed peft model (LoRA weights of the last epoch), the per-epoch checkpoints and the optimizer."""

    model: nn.Module
    checkpoints: list[LessCheckpoint]
    optimizer: torch.optim.AdamW
    names: list[str] = field(default_factory=list)
    """LoRA parameter names in feature order (``named_parameters`` order)."""


def _linear_with_warmup(step: int, total: int, warmup: int) -> float:
    # transformers.get_linear_schedule_with_warmup's lambda, so step 0 of a warm-up has lr 0 as in HF
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cloned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in tensors.items()}


def lora_warmup(
    model: nn.Module, batches: Sequence[TokenBatch], config: LessConfig = LessConfig(), progress: bool = False
) -> LessWarmup:
    """LESS step 1: train LoRA adapters on a copy of ``model`` (base weights frozen and never changed).

    Args:
        model: a causal LM (not modified: a deep copy gets the adapters).
        batches: the warm-up subset, one ``TokenBatch`` per sample or more; re-batched into ``config.batch_size``
            rows in a seeded shuffled order every epoch.
        config: see ``LessConfig``.

    Returns:
        ``LessWarmup`` with one checkpoint per epoch.

    Raises:
        DataError: no samples, or a sample without a supervised token.
        ConfigError: no module matches ``config.target_modules``.
    """
    import peft

    rows = [b.select([i]) for b in batches for i in range(len(b))]
    if not rows:
        raise DataError("LESS warm-up got no samples; give it at least one tokenized pool sample")
    for row in rows:
        if not (row.labels[:, 1:] != IGNORE_INDEX).any():
            raise DataError(f"LESS warm-up sample {row.sample_ids[0]!r} has no supervised token")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # LoRA init (kaiming A, zero B) and dropout masks
        lora = peft.LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha or 4 * config.lora_rank,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            peft_model = peft.get_peft_model(copy.deepcopy(model), lora)
        except ValueError as exc:
            raise ConfigError(f"LessConfig.target_modules {config.target_modules}: {exc}") from None
        names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        params = [p for n, p in peft_model.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
        per_epoch = math.ceil(len(rows) / config.batch_size)
        total = per_epoch * config.epochs
        warm = math.ceil(config.warmup_ratio * total)
        device = next(peft_model.parameters()).device
        rng = np.random.default_rng(config.seed)
        checkpoints: list[LessCheckpoint] = []
        step = 0
        peft_model.train()
        bar = tqdm(total=total, disable=not progress, desc="LESS warm-up", unit="step")
        for epoch in range(config.epochs):
            order = rng.permutation(len(rows)).tolist()
            lrs = []
            for start in range(0, len(rows), config.batch_size):
                chunk = [rows[i].to(device) for i in order[start : start + config.batch_size]]
                lr = config.lr * _linear_with_warmup(step, total, warm)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                # one backward per sample (the authors' micro-batch of 1 with accumulation): the step's loss is the
                # mean of per-sample mean-token losses, and padding never enters a forward pass
                total_loss = 0.0
                for row in chunk:
                    logits = peft_model(input_ids=row.input_ids, attention_mask=row.attention_mask).logits
                    loss = mean_token_loss(logits, row.labels)[0] / len(chunk)
                    loss.backward()
                    total_loss += float(loss.detach())
                if not math.isfinite(total_loss):
                    raise NumericalError(f"LESS warm-up: non-finite loss at step {step}")
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                lrs.append(lr)
                step += 1
                bar.update(1)
            state = {n: optimizer.state[p] for n, p in zip(names, params, strict=True)}
            checkpoints.append(
                LessCheckpoint(
                    epoch=epoch + 1,
                    lora=_cloned({n: p for n, p in zip(names, params, strict=True)}),
                    exp_avg=_cloned({n: s["exp_avg"] for n, s in state.items()}),
                    exp_avg_sq=_cloned({n: s["exp_avg_sq"] for n, s in state.items()}),
                    step=step,
                    mean_lr=float(np.mean(lrs)),
                )
            )
            logger.info("LESS warm-up epoch %d/%d: last loss %.4f, mean lr %.3g", epoch + 1, config.epochs,
                        total_loss, checkpoints[-1].mean_lr)
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        peft_model.eval()
    return LessWarmup(peft_model, checkpoints, optimizer, names)


@torch.no_grad()
def _load(model: nn.Module, checkpoint: LessCheckpoint) -> None:
    params = dict(model.named_parameters())
    for name, value in checkpoint.lora.items():
        params[name].copy_(value)


def adam_features(
    warm: LessWarmup,
    batches: Iterable[TokenBatch],
    config: LessConfig = LessConfig(),
    kind: str = "adam",
    progress: bool = False,
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """LESS step 2: per-sample features at every checkpoint, streamed one batch at a time.

    Args:
        warm: from ``lora_warmup``; its model's LoRA weights are set to each checkpoint in turn (left at the last).
        batches: samples to featurise.
        kind: ``adam`` for training (pool) samples, ``sgd`` for target samples.

    Yields:
        ``(sample_ids, (B, C, d) float32)``: projected, then unit-normalised, one row per checkpoint.
    """
    if kind not in ("adam", "sgd"):
        raise ConfigError(f"adam_features kind must be 'adam' or 'sgd'; got {kind!r}")
    names = warm.names
    params = dict(warm.model.named_parameters())
    dim = sum(params[n].numel() for n in names)
    # one projector for every checkpoint and for pool and targets alike (the authors' fixed model_id seed)
    projector = make_projector(config.proj_type, dim, config.proj_dim, config.seed) if config.proj_dim < dim else None
    beta1, beta2 = config.betas
    moments = [
        (torch.cat([c.exp_avg[n].reshape(-1) for n in names]), torch.cat([c.exp_avg_sq[n].reshape(-1) for n in names]))
        for c in warm.checkpoints
    ]
    for batch in tqdm(batches, disable=not progress, desc=f"LESS {kind} features", unit="batch"):
        per_checkpoint = []
        for checkpoint, (m, v) in zip(warm.checkpoints, moments, strict=True):
            _load(warm.model, checkpoint)
            grads = _per_sample(warm.model, batch, names, 1)
            g = torch.cat([grads[n].reshape(len(batch), -1) for n in names], dim=1).float()
            if kind == "adam":
                m_new = beta1 * m.to(g.device) + (1 - beta1) * g
                v_new = beta2 * v.to(g.device) + (1 - beta2) * g.square()
                g = m_new / torch.sqrt(v_new + config.eps)
            if not bool(torch.isfinite(g).all()):
                bad = int((~torch.isfinite(g)).any(dim=1).nonzero()[0])
                raise NumericalError(f"sample {batch.sample_ids[bad]!r}: non-finite LESS feature")
            projected = g if projector is None else projector.project(g)
            norms = projected.norm(dim=1, keepdim=True)
            if bool((norms == 0).any()):
                bad = int((norms[:, 0] == 0).nonzero()[0])
                raise NumericalError(f"sample {batch.sample_ids[bad]!r}: zero LESS feature cannot be normalised")
            per_checkpoint.append((projected / norms).cpu())
        yield list(batch.sample_ids), torch.stack(per_checkpoint, dim=1)


def less_select(
    sample_ids: Sequence[str],
    scores: np.ndarray,
    budget: int,
    sources: Sequence[str] | None = None,
    per_source_cap: int | None = None,
) -> Selection:
    """LESS step 3's selection: the ``budget`` highest scores (``write_selected_data.py``), ties by sample id."""
    from idistill_core.steps.select import select_top_k

    return select_top_k(list(sample_ids), np.asarray(scores, dtype=np.float64), budget, sources=sources,
                        per_source_cap=per_source_cap)


def less_scores(
    pool_grads: Iterable[tuple[list[str], torch.Tensor]],
    target_grads: torch.Tensor,
    target_groups: Sequence[str] | None = None,
    checkpoint_weights: Sequence[float] | None = None,
) -> tuple[list[str], np.ndarray]:
    """LESS score (paper §9.5; ``less/data_selection/matching.py``): the checkpoint-weighted sum of cosines of each
    pool feature with each target feature, averaged within each target group (sub-task), then the max over groups.

    ``score(z) = max_g mean_{t ∈ g} Σ_c w_c cos(pool_c(z), target_c(t))``; without ``checkpoint_weights`` there is
    one checkpoint and ``w = 1``.

    Args:
        pool_grads: stream of ``(ids, (B, P))``, or ``(ids, (B, C, P))`` with checkpoint weights (``features.adam_features``).
        target_grads: ``(T, P)``, or ``(C, T, P)`` with checkpoint weights.
        target_groups: ``T`` group names; None = one group (plain mean over targets).
        checkpoint_weights: ``C`` weights (LESS: each checkpoint's mean learning rate, not normalised).

    Returns:
        ``(ids, (N,) float64)``; select with ``select.select_top_k``.
    """
    if checkpoint_weights is None:
        if target_grads.ndim != 2 or target_grads.shape[0] == 0:
            raise DataError(f"target_grads must be (T, P) with T >= 1; got {tuple(target_grads.shape)}")
        target_grads = target_grads[None]
        weights = torch.ones(1, dtype=torch.float64)
    else:
        weights = torch.as_tensor(list(checkpoint_weights), dtype=torch.float64)
        if target_grads.ndim != 3 or target_grads.shape[1] == 0 or target_grads.shape[0] != len(weights):
            raise DataError(
                f"target_grads must be (C={len(weights)}, T >= 1, P) with checkpoint weights; "
                f"got {tuple(target_grads.shape)}"
            )
    num_targets = target_grads.shape[1]
    groups = ["all"] * num_targets if target_groups is None else list(target_groups)
    if len(groups) != num_targets:
        raise DataError(f"target_groups has {len(groups)} names for {num_targets} target gradients")
    names = sorted(set(groups))
    membership = torch.zeros(len(groups), len(names), dtype=torch.float64)
    for row, g in enumerate(groups):
        membership[row, names.index(g)] = 1.0
    membership /= membership.sum(dim=0, keepdim=True)  # column j averages group j's targets
    targets = F.normalize(target_grads.double(), dim=2)  # (C, T, P)
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for batch_ids, grads in pool_grads:
        grads = grads[:, None] if checkpoint_weights is None else grads
        if grads.ndim != 3 or grads.shape[1] != targets.shape[0] or grads.shape[2] != targets.shape[2]:
            raise DataError(
                f"pool features have shape {tuple(grads.shape)}; target features are (C, T, P) = "
                f"{tuple(targets.shape)}"
            )
        cos = torch.einsum("bcp,ctp->bct", F.normalize(grads.double(), dim=2), targets)
        weighted = torch.einsum("bct,c->bt", cos, weights)
        parts.append((weighted @ membership).max(dim=1).values.numpy())
        ids.extend(batch_ids)
    if not ids:
        raise DataError("pool_grads is empty")
    return ids, np.concatenate(parts)


def less_outcome(
    model, tokenizer, pool_examples, target_examples, budget: int, config: LessConfig, batch_size: int = 8,
    per_source_cap: int | None = None, source_of: Mapping[str, str] | None = None,
    target_subtasks: Mapping[str, str] | None = None, progress: bool = False,
) -> SelectionOutcome:
    """LESS end to end: LoRA warm-up on a seeded ``config.warmup_fraction`` of the
    pool, Adam features of every pool sample and SGD features of every target at each epoch's checkpoint,
    learning-rate-weighted cosine, mean within each target sub-task, max over sub-tasks, top-k. ``model`` itself
    is not changed (the adapters go on a copy).

    ``target_subtasks``: target sample id → sub-task (LESS's MMLU subjects, BBH tasks, TyDiQA languages; the CLI
    passes each target row's ``source``); None = the whole target set is one sub-task (a plain mean).
    """
    cfg = config
    pool_ids = list(pool_examples["sample_id"])
    check_budget(budget, len(pool_ids))
    target_ids = list(target_examples["sample_id"])
    missing = [t for t in target_ids if target_subtasks is not None and t not in target_subtasks]
    if missing:
        raise ConfigError(f"target sample '{missing[0]}' has no sub-task in target_subtasks.")
    groups = ["all"] * len(target_ids) if target_subtasks is None else [str(target_subtasks[t]) for t in target_ids]
    n = len(pool_ids)
    size = max(1, int(n * cfg.warmup_fraction))  # the authors' int(len * percentage)
    rows = np.random.default_rng(cfg.seed).choice(n, size=size, replace=False)
    warm_batches = list(iter_batches(pool_examples.select(sorted(int(r) for r in rows)), 1, pad_id(tokenizer)))
    warm = lora_warmup(model, warm_batches, cfg, progress=progress)
    weights = [c.mean_lr for c in warm.checkpoints]
    target_rows = [g for _, g in adam_features(
        warm, batches_for(target_examples, tokenizer, batch_size, bucket=False), cfg, kind="sgd")]
    targets = torch.cat(target_rows).transpose(0, 1)  # (C, T, d), targets in file order like `groups`
    got, scores = less_scores(
        adam_features(warm, batches_for(pool_examples, tokenizer, batch_size), cfg, progress=progress),
        targets, groups, weights,
    )
    scores = np.asarray(in_order(pool_ids, list(got), scores), dtype=np.float64)  # batches were length-bucketed
    picked = list(less_select(pool_ids, scores, budget, **cap_options(pool_ids, per_source_cap, source_of)).sample_ids)
    details = {"warmup_ids": [pool_ids[int(r)] for r in sorted(rows)], "checkpoint_weights": weights,
               "subtasks": sorted(set(groups))}
    return SelectionOutcome(pool_ids, scores, uniform_weights(pool_ids, picked), picked, "less", details)


def select(ctx: SelectionContext) -> SelectionReport:
    """LESS end to end (:func:`less_outcome`), sub-tasks from ``ctx.target_subtasks``."""
    with ctx.timed("baseline"):
        outcome = less_outcome(
            ctx.model, ctx.tokenizer, ctx.pool, ctx.targets, ctx.budget, ctx.recipe.less, ctx.recipe.batch_size,
            ctx.recipe.per_source_cap, ctx.source_of, ctx.target_subtasks,
        )
    return ctx.report(outcome)
