"""Frozen copy of the hand-written fine-tuning loop (main:idistill_core/training/finetune.py before issue 16).

Kept ONLY as the reference that tests/core/test_train.py and benchmarks/studies/finetune_trl.py compare the TRL path
against (same seed and recipe -> same loss curve). Not part of the library; do not import it from idistill_core.
"""

# ruff: noqa

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from idistill_core.data.batch import IGNORE_INDEX, collate
from idistill_core.errors import ConfigError, DataError, NumericalError, StoreError
from idistill_core.store.hashing import config_fingerprint
from idistill_core.models.loading import model_fingerprint

logger = logging.getLogger("idistill")

SUMMARY_FILE = "train_summary.json"
PRECISIONS = ("bf16-autocast", "fp32")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning recipe. Exactly one of ``epochs`` / ``max_steps`` sets the run length."""

    lr: float = 1e-4
    """Peak AdamW learning rate (reached after warm-up); must be > 0."""
    epochs: int | None = None
    """Passes over the examples (each reshuffled); set it and ``max_steps=None`` to train by epochs."""
    max_steps: int | None = 50
    """Optimizer steps; the examples are cycled (reshuffled every epoch) until this many steps are done."""
    batch_size: int = 8
    """Examples per micro-batch; must be >= 1."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; must be >= 1."""
    warmup_ratio: float = 0.1
    """Fraction of the steps with linear warm-up from 0 to ``lr``, then linear decay to 0; in [0, 1)."""
    weight_decay: float = 0.0
    """Decoupled AdamW weight decay on matrices (norm weights and biases are never decayed); >= 0."""
    max_grad_norm: float | None = 1.0
    """Global gradient-norm clip; ``None`` disables clipping. Must be > 0 when set."""
    seed: int = 0
    """Seed of the shuffling generator (and of LoRA's adapter init)."""
    precision: str = "bf16-autocast"
    """``"bf16-autocast"`` (fp32 weights and optimizer, bf16 matmuls; ~1.4x faster on this CPU) or
    ``"fp32"``."""
    use_weights: bool = False
    """Scale each sample's token losses by its weight (``weights`` argument or a ``weight`` column)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (slower)."""
    lora_rank: int | None = None
    """Train rank-r LoRA adapters on all linear layers, not all weights (needs ``peft``); merged on save."""

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.max_steps is None):
            raise ConfigError(
                "FinetuneConfig needs exactly one of epochs / max_steps; "
                f"got epochs={self.epochs}, max_steps={self.max_steps}"
            )
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"FinetuneConfig.epochs must be >= 1; got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"FinetuneConfig.max_steps must be >= 1; got {self.max_steps}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"FinetuneConfig.lr must be a finite number > 0; got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"FinetuneConfig.batch_size must be >= 1; got {self.batch_size}")
        if self.grad_accum < 1:
            raise ConfigError(f"FinetuneConfig.grad_accum must be >= 1; got {self.grad_accum}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"FinetuneConfig.warmup_ratio must be in [0, 1); got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"FinetuneConfig.weight_decay must be >= 0; got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"FinetuneConfig.max_grad_norm must be > 0 or None; got {self.max_grad_norm}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"FinetuneConfig.precision must be one of {PRECISIONS}; got {self.precision!r}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError(f"FinetuneConfig.lora_rank must be >= 1 or None; got {self.lora_rank}")

    def fingerprint(self) -> str:
        return config_fingerprint(self)


@dataclass
class FinetuneResult:
    """What a fine-tune did. ``losses[i]``: mean supervised-token CE of step ``i`` (before its update)."""

    losses: list[float]
    steps: int
    tokens: int
    """Non-padding input tokens processed (all steps)."""
    seconds: float
    path: Path | None
    supervised_tokens: int = 0
    """Tokens that carried loss (all steps)."""
    cached: bool = False
    """True when an existing checkpoint with the same fingerprint was reused instead of training."""
    fingerprint: str = ""
    """Cache key: config fingerprint + data hash + base-model digest."""
    extra: dict[str, Any] = field(default_factory=dict)


def finetune(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Iterable[Mapping],
    config: FinetuneConfig = FinetuneConfig(),
    out_dir: str | Path | None = None,
    weights: Mapping[str, float] | None = None,
    progress: bool = False,
    log_every: int = 10,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``examples``; optionally save a checkpoint to ``out_dir``.

    Args:
        model: a ``transformers`` causal LM (``model(input_ids, attention_mask).logits``: (B, S, V)).
        tokenizer: its tokenizer; gives the pad id and is saved with the checkpoint (may be None).
        examples: tokenized examples ``{sample_id, input_ids, labels[, weight]}`` (a list or a
            ``datasets.Dataset``); labels are -100 where no loss is taken. Read fully into memory.
        config: the recipe.
        out_dir: where to save the fine-tuned model (standard HF dir + ``train_summary.json``). When it
            already holds a run with the same cache key (config, data, base model), that run is reused:
            its weights are loaded into ``model`` and its result returned without training.
        weights: ``sample_id -> weight`` (>= 0), used only when ``config.use_weights``; overrides a
            ``weight`` column.
        progress: show a tqdm bar over steps.
        log_every: log the loss every this many steps on the ``idistill`` logger (0 = never).

    Returns:
        FinetuneResult with one loss per step.

    Raises:
        DataError: no examples, an example without supervised tokens, or a bad/missing weight.
        ConfigError: LoRA asked without ``peft`` installed.
        NumericalError: a non-finite loss (names the step and its sample ids).
    """
    rows = _read_examples(examples)
    sample_weights = _resolve_weights(rows, weights, config.use_weights)
    # The base model is part of the cache key: the same data and recipe from another start is another run.
    base_digest = model_fingerprint(model)
    key = _cache_key(config, rows, sample_weights, base_digest)
    if out_dir is not None:
        cached = _load_cached(Path(out_dir), key, model)
        if cached is not None:
            return cached

    pad_id = _pad_token_id(tokenizer)
    device = next(model.parameters()).device
    train_model = _maybe_wrap_lora(model, config)
    if config.gradient_checkpointing:
        _set_checkpointing(train_model, True)

    steps = _plan_steps(len(rows), config)
    optimizer = _make_optimizer(train_model, config)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(config.warmup_ratio * len(steps)), len(steps)
    )
    generator = torch.Generator().manual_seed(config.seed)
    order = _epoch_orders(len(rows), generator)

    losses: list[float] = []
    tokens = supervised = 0
    was_training = train_model.training
    train_model.train()
    # Gradients left on the model by earlier work (a warm-up, a gradient pass) must not leak into step 0.
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    try:
        for step, micro_sizes in enumerate(tqdm(steps, desc="finetune", disable=not progress)):
            micro = [[rows[next(order)] for _ in range(size)] for size in micro_sizes]
            # Normalise by the supervised tokens of the whole accumulated step, not per micro-batch:
            # a mean of micro-batch means would give tokens in short micro-batches more weight, so the
            # result would depend on how the step happens to be split.
            step_tokens = sum(_num_supervised(e) for chunk in micro for e in chunk)
            step_loss = 0.0
            for chunk in micro:
                batch = collate(chunk, pad_id).to(device)
                w = None
                if sample_weights is not None:
                    w = torch.tensor([sample_weights[e["sample_id"]] for e in chunk], device=device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision != "fp32"):
                    logits = train_model(
                        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                    ).logits
                loss_sum = token_loss_sum(logits, batch.labels, w)
                loss = loss_sum / step_tokens
                if not torch.isfinite(loss):
                    raise NumericalError(
                        f"non-finite training loss at step {step} (samples {batch.sample_ids[:8]})"
                    )
                loss.backward()
                step_loss += float(loss.detach())
                tokens += int(batch.attention_mask.sum())
            supervised += step_tokens
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in train_model.parameters() if p.requires_grad], config.max_grad_norm
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            if log_every and (step + 1) % log_every == 0:
                logger.info(
                    "finetune step %d/%d loss %.4f lr %.2e",
                    step + 1,
                    len(steps),
                    step_loss,
                    scheduler.get_last_lr()[0],
                )
    finally:
        if config.gradient_checkpointing:
            _set_checkpointing(train_model, False)
        train_model.train(was_training)
    seconds = time.perf_counter() - start

    final_model = _maybe_merge_lora(train_model, config)
    result = FinetuneResult(losses, len(steps), tokens, seconds, None, supervised, False, key)
    if out_dir is not None:
        summary = {
            "config": dataclasses.asdict(config),
            "config_fingerprint": config.fingerprint(),
            "cache_key": key,
            "base_model_digest": base_digest,
            "num_examples": len(rows),
            "losses": losses,
            "steps": len(steps),
            "tokens": tokens,
            "supervised_tokens": supervised,
            "seconds": seconds,
        }
        result.path = save_checkpoint(final_model, tokenizer, out_dir, summary=summary)
    return result


def token_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of next-token cross-entropies over supervised positions, optionally weighted per row.

    Args:
        logits: (B, S, V), any float dtype (the CE is taken in float32).
        labels: (B, S) with ``-100`` where no loss is taken; position ``t`` is predicted from ``t - 1``.
        weights: optional (B,) per-row factors.

    Returns:
        scalar tensor.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    if weights is not None:
        ce = ce * weights.to(ce.dtype)[:, None]
    return ce.sum()


def save_checkpoint(
    model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, summary: Mapping | None = None
) -> Path:
    """Write ``model`` (+ tokenizer, + ``train_summary.json``) as a standard HF dir, atomically.

    Everything is written into ``<out_dir>.tmp-<pid>`` first and moved into place with ``os.replace``, so
    ``out_dir`` never holds a half-written checkpoint. An existing ``out_dir`` is moved aside first and
    deleted after the swap.

    Returns:
        ``Path(out_dir)``.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if summary is not None:
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
        old = None
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def data_hash(examples: Iterable[Mapping], weights: Mapping[str, float] | None = None) -> str:
    """Order-sensitive hash of tokenized examples (order matters: it seeds which batch each sample is in)."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([str(e["sample_id"]), list(e["input_ids"]), list(e["labels"])]).encode())
        if weights is not None:
            digest.update(repr(float(weights[str(e["sample_id"])])).encode())
    return digest.hexdigest()[:16]


# --- internals ---------------------------------------------------------------------------------------


def _read_examples(examples: Iterable[Mapping]) -> list[dict]:
    rows: list[dict] = []
    seen: set[str] = set()
    for e in examples:
        for key in ("sample_id", "input_ids", "labels"):
            if key not in e:
                raise DataError(f"tokenized example {len(rows)} has no '{key}' field")
        sid = str(e["sample_id"])
        if sid in seen:
            raise DataError(f"sample id '{sid}' appears twice in the training examples")
        seen.add(sid)
        row = {"sample_id": sid, "input_ids": list(e["input_ids"]), "labels": list(e["labels"])}
        if len(row["input_ids"]) != len(row["labels"]):
            raise DataError(
                f"sample '{sid}' has {len(row['input_ids'])} input_ids but {len(row['labels'])} labels"
            )
        if _num_supervised(row) == 0:
            raise DataError(
                f"sample '{sid}' has no supervised token after the first position (labels all -100)"
            )
        if "weight" in e and e["weight"] is not None:
            row["weight"] = float(e["weight"])
        rows.append(row)
    if not rows:
        raise DataError("finetune() got no training examples")
    return rows


def _num_supervised(example: Mapping) -> int:
    # Position 0 has no preceding token, so its label can never be predicted.
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


def _resolve_weights(
    rows: list[dict], weights: Mapping[str, float] | None, use_weights: bool
) -> dict[str, float] | None:
    if not use_weights:
        if weights is not None:
            logger.info(
                "finetune: weights passed but FinetuneConfig.use_weights is False; training unweighted"
            )
        return None
    resolved: dict[str, float] = {}
    for row in rows:
        sid = row["sample_id"]
        if weights is not None:
            if sid not in weights:
                raise DataError(
                    f"FinetuneConfig.use_weights is set but sample '{sid}' has no entry in weights"
                )
            w = float(weights[sid])
        elif "weight" in row:
            w = row["weight"]
        else:
            raise DataError(
                f"FinetuneConfig.use_weights is set but sample '{sid}' has no 'weight' column value "
                "and no weights were passed"
            )
        if not (math.isfinite(w) and w >= 0):
            raise DataError(f"sample '{sid}' has weight {w}; weights must be finite and >= 0")
        resolved[sid] = w
    return resolved


def _plan_steps(num_examples: int, config: FinetuneConfig) -> list[list[int]]:
    """Micro-batch sizes of every step. Micro-batches never straddle an epoch boundary."""
    full, rest = divmod(num_examples, config.batch_size)
    per_epoch = [config.batch_size] * full + ([rest] if rest else [])
    steps: list[list[int]] = []
    current: list[int] = []

    def epoch_stream() -> Iterator[int]:
        epoch = 0
        while config.epochs is None or epoch < config.epochs:
            yield from per_epoch
            epoch += 1

    for size in epoch_stream():
        current.append(size)
        if len(current) == config.grad_accum:
            steps.append(current)
            current = []
            if config.max_steps is not None and len(steps) == config.max_steps:
                return steps
    if current:
        steps.append(current)
    return steps


def _epoch_orders(n: int, generator: torch.Generator) -> Iterator[int]:
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


def _make_optimizer(model: torch.nn.Module, config: FinetuneConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # Decaying norm gains and biases pulls them towards 0, which is not a sensible prior for them.
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def _pad_token_id(tokenizer: Any) -> int:
    if tokenizer is None:
        return 0
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _set_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (old names warn).
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _maybe_wrap_lora(model: torch.nn.Module, config: FinetuneConfig) -> torch.nn.Module:
    if config.lora_rank is None:
        return model
    try:
        import peft
    except ImportError as exc:
        raise ConfigError(
            f"FinetuneConfig.lora_rank={config.lora_rank} needs peft; pip install idistill[lora]"
        ) from exc
    torch.manual_seed(config.seed)  # peft initialises adapters from the global RNG; no generator hook
    lora = peft.LoraConfig(
        r=config.lora_rank,
        lora_alpha=2 * config.lora_rank,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora)


def _maybe_merge_lora(model: torch.nn.Module, config: FinetuneConfig) -> torch.nn.Module:
    if config.lora_rank is None:
        return model
    # Merging writes the adapters into the base weights (in place), so the saved dir is a plain HF model.
    return model.merge_and_unload()


def _cache_key(config: FinetuneConfig, rows: list[dict], weights: dict[str, float] | None, base: str) -> str:
    return f"{config.fingerprint()}-{data_hash(rows, weights)}-{base}"


def _load_cached(out: Path, key: str, model: torch.nn.Module) -> FinetuneResult | None:
    summary_path = out / SUMMARY_FILE
    if not summary_path.is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise StoreError(
            f"{summary_path} is not valid JSON ({exc.msg}); delete the directory to retrain"
        ) from exc
    if summary.get("cache_key") != key:
        logger.info(
            "finetune: %s holds a different run (%s != %s); retraining", out, summary.get("cache_key"), key
        )
        return None
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(
        out, dtype=next(model.parameters()).dtype, use_safetensors=True, trust_remote_code=False
    )
    missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
    if unexpected or [k for k in missing if k not in _tied_keys(model)]:
        raise StoreError(
            f"checkpoint {out} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    logger.info("finetune: reusing cached checkpoint %s", out)
    return FinetuneResult(
        losses=list(summary["losses"]),
        steps=int(summary["steps"]),
        tokens=int(summary["tokens"]),
        seconds=float(summary["seconds"]),
        path=out,
        supervised_tokens=int(summary.get("supervised_tokens", 0)),
        cached=True,
        fingerprint=key,
    )


def _tied_keys(model: torch.nn.Module) -> set[str]:
    names = set()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        names.add("lm_head.weight")
    return names
