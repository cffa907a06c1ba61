"""Fine-tuning is TRL's ``SFTTrainer``; ours: recipe -> SFTConfig, the weighted loss (TRL has none), cached atomic checkpoints.

This is the last step of the paper's protocol (§7 of ``research/paper.md``): full fine-tuning (or LoRA through
peft) with AdamW, a linear schedule with warm-up and the loss on assistant tokens only. The paper trains on the
selected subset *unweighted*; per-sample weights (the QP weights of §1.4) are an opt-in
(``FinetuneConfig.use_weights``), normalised by the weighted token count of the step.

What stays here, and why no library does it:

* the mapping from our typed recipe to ``trl.SFTConfig`` (everything else - optimizer, schedule, accumulation,
  bf16 autocast, gradient checkpointing, LoRA, multi-GPU through ``accelerate launch`` - is the trainer's);
* the assistant mask: our tokenisation (``data.tokenize_rows``) works for any chat template, while TRL's own
  ``assistant_only_loss`` needs ``{% generation %}`` markers that most templates (SmolLM2's) lack, so the rows
  go to TRL pre-tokenized with an ``assistant_masks`` column and TRL builds the labels from it;
* ``compute_loss`` for sample weights (TRL and transformers only weight by token);
* checkpoints keyed by (recipe, data, base model) and swapped in atomically, so an identical subset trains once
  and a killed run never leaves a half-written directory (``Trainer`` saves to a fixed ``output_dir``).

A step is one optimizer update over ``grad_accum`` micro-batches of ``batch_size`` examples (per device).

Why one module of ~650 lines: the TRL mapping, the weighted loss and the checkpoint cache are one contract (a
checkpoint's key is the recipe + data + base model the trainer saw); most of the length is docstrings of that
contract. Writing a checkpoint atomically is :mod:`idistill_core.training.checkpoints`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import numbers
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from idistill_core.data.batch import IGNORE_INDEX, pad_id
from idistill_core.errors import ConfigError, DataError, NumericalError, StoreError
from idistill_core.models.loading import model_fingerprint
from idistill_core.store.hashing import config_fingerprint
from idistill_core.training.checkpoints import (
    SUMMARY_FILE,
    atomic_dir,
    data_hash,
    tied_keys,
    write_checkpoint,
)

logger = logging.getLogger("idistill")

ADAPTER_DIR = "adapter"
"""Sub-directory of a LoRA checkpoint holding the unmerged peft adapter (``PeftModel.from_pretrained``)."""
PRECISIONS = ("auto", "bf16-autocast", "fp32")
ENGINE = "trl-sft"
"""Part of the cache key: a checkpoint from another training implementation is another run."""


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
    """Examples per micro-batch and device; must be >= 1."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; must be >= 1."""
    warmup_ratio: float = 0.1
    """Fraction of the steps (rounded) with linear warm-up from 0 to ``lr``, then linear decay to 0; in [0, 1)."""
    weight_decay: float = 0.0
    """Decoupled AdamW weight decay (never on norm weights and biases: the trainer excludes them); >= 0."""
    max_grad_norm: float | None = 1.0
    """Global gradient-norm clip; ``None`` disables clipping. Must be > 0 when set."""
    seed: int = 0
    """Seed of the trainer (data order, LoRA's adapter init)."""
    precision: str = "auto"
    """``"auto"`` (bf16-autocast where the device runs bfloat16 natively and a probe measures it faster, else
    fp32; ``resolve_precision``), ``"bf16-autocast"`` (fp32 weights and optimizer, bf16 matmuls) or ``"fp32"``."""
    use_weights: bool = False
    """Scale each sample's token losses by its weight (``weights`` argument or a ``weight`` column)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (slower)."""
    lora_rank: int | None = None
    """Train rank-r LoRA adapters (peft) on all linear layers, not all weights; merged into the saved model,
    the adapter itself is saved too (``adapter/``)."""
    lora_alpha: float | None = None
    """LoRA scaling numerator; ``None`` means ``2 * lora_rank``."""

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
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"FinetuneConfig.lora_alpha must be > 0 or None; got {self.lora_alpha}")
        if not math.isfinite(self.weight_decay):
            raise ConfigError(f"FinetuneConfig.weight_decay must be a finite number >= 0; got {self.weight_decay}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed <= 2**32 - 1:
            raise ConfigError(f"FinetuneConfig.seed must be an integer in [0, 2**32 - 1]; got {self.seed!r}")

    def fingerprint(self) -> str:
        return config_fingerprint(self)


@dataclass
class FinetuneResult:
    """What a fine-tune did. ``losses[i]``: mean supervised-token CE of step ``i`` (before its update), as the
    trainer logged it."""

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
    """Cache key: engine + config fingerprint + data hash + base-model digest."""
    extra: dict[str, Any] = field(default_factory=dict)
    """``log_history`` (the trainer's per-step logs: loss, lr, grad_norm...), ``precision``, ``trl`` version."""


def resolve_precision(precision: str, model: torch.nn.Module) -> str:
    """``"auto"`` -> ``"bf16-autocast"`` or ``"fp32"`` for ``model``'s device; explicit values pass through.

    ``auto`` asks ``precision.PrecisionResolver`` (capability + a measured matmul probe of the model's shapes).
    """
    if precision != "auto":
        return precision
    from idistill_core.models.precision import PrecisionResolver, finetune_precision

    return finetune_precision("auto", PrecisionResolver().resolve_for_model("auto", model))


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
    """Fine-tune ``model`` in place on ``examples`` with ``trl.SFTTrainer``; optionally save a checkpoint.

    Args:
        model: a ``transformers`` causal LM. With LoRA the adapters are merged back into it afterwards.
        tokenizer: its tokenizer (the trainer's ``processing_class``; saved with the checkpoint). A copy is
            given to the trainer, so the caller's tokenizer is not changed.
        examples: tokenized examples ``{sample_id, input_ids, labels[, weight]}`` (a list or a
            ``datasets.Dataset``, as ``data.tokenize_rows`` makes them); labels are -100 where no loss is taken
            and equal to ``input_ids`` elsewhere. Read fully into memory.
        config: the recipe.
        out_dir: where to save the fine-tuned model (standard HF dir + ``train_summary.json``, + ``adapter/``
            with LoRA). When it already holds a run with the same cache key (engine, config, data, base model),
            that run is reused: its weights are loaded into ``model`` and its result returned without training.
        weights: ``sample_id -> weight`` (>= 0), used only when ``config.use_weights``; overrides a
            ``weight`` column.
        progress: show the trainer's progress bar.
        log_every: log the loss every this many steps on the ``idistill`` logger (0 = never).

    Returns:
        FinetuneResult with one loss per step.

    Raises:
        DataError: no examples, an example without supervised tokens, labels that are not the input ids, or a
            bad/missing weight.
        ConfigError: no tokenizer.
        NumericalError: a non-finite loss (names the step).
    """
    rows = _read_examples(examples)
    sample_weights = _resolve_weights(rows, weights, config.use_weights)
    if tokenizer is None:
        raise ConfigError("finetune() needs the model's tokenizer (SFTTrainer's processing_class); got None")
    # Resolved before the cache key: a run in another precision is another run.
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, model))
    # The base model is part of the cache key: the same data and recipe from another start is another run.
    base_digest = model_fingerprint(model)
    key = _cache_key(config, rows, sample_weights, base_digest)
    if out_dir is not None:
        cached = _load_cached(Path(out_dir), key, model)
        if cached is not None:
            return cached

    import trl

    with tempfile.TemporaryDirectory(prefix="idistill-sft-") as scratch:
        trainer = _build_trainer(model, tokenizer, rows, sample_weights, config, scratch, progress, log_every)
        try:
            output = trainer.train()
        finally:
            if config.gradient_checkpointing:
                _disable_checkpointing(trainer.model)
    losses = [float(log["loss"]) for log in trainer.state.log_history if "loss" in log]
    seconds = float(output.metrics.get("train_runtime", 0.0))
    extra = {
        "log_history": trainer.state.log_history,
        "precision": config.precision,
        "trl": trl.__version__,
    }
    result = FinetuneResult(
        losses,
        int(trainer.state.global_step),
        trainer.token_counts["tokens"],
        seconds,
        None,
        trainer.token_counts["supervised"],
        False,
        key,
        extra,
    )
    trained = trainer.model
    summary = {
        "engine": ENGINE,
        "trl_version": trl.__version__,
        "config": dataclasses.asdict(config),
        "config_fingerprint": config.fingerprint(),
        "cache_key": key,
        "base_model_digest": base_digest,
        "num_examples": len(rows),
        "losses": losses,
        "log_history": trainer.state.log_history,
        "steps": result.steps,
        "tokens": result.tokens,
        "supervised_tokens": result.supervised_tokens,
        "seconds": seconds,
    }
    # Under `accelerate launch` every rank holds the same weights; one writes the checkpoint.
    writer = trainer.is_world_process_zero()
    del trainer  # drops the optimizer state before the merge/save
    if out_dir is None or not writer:
        _merge_lora(trained, config)
        return result
    with atomic_dir(Path(out_dir)) as tmp:
        if config.lora_rank is not None:
            trained.save_pretrained(
                tmp / ADAPTER_DIR
            )  # the adapter alone, before merging changes the weights
        final = _merge_lora(trained, config)
        write_checkpoint(final, tokenizer, tmp, summary)
    result.path = Path(out_dir)
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


def weighted_token_count(labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i * n_i``: row ``i``'s supervised next-token count ``n_i`` times its weight (float32 scalar)."""
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).to(torch.float32)
    return (counts * weights.to(torch.float32)).sum()


def sft_dataset(rows: list[dict], weights: Mapping[str, float] | None = None):
    """The pre-tokenized dataset SFTTrainer gets: ``input_ids`` and ``assistant_masks`` (1 where our labels
    carry loss), plus ``weight`` when weighted. TRL turns the mask into its labels."""
    import datasets

    columns: dict[str, list] = {
        "input_ids": [r["input_ids"] for r in rows],
        "assistant_masks": [[int(x != IGNORE_INDEX) for x in r["labels"]] for r in rows],
    }
    if weights is not None:
        columns["weight"] = [float(weights[r["sample_id"]]) for r in rows]
    return datasets.Dataset.from_dict(columns)


# --- the trainer -------------------------------------------------------------------------------------


def _trainer_class():
    """``SFTTrainer`` plus sample weights and token counts (a function: trl is imported only when training)."""
    import trl

    class WeightedSFTTrainer(trl.SFTTrainer):
        """Rows may carry a ``weight``; the step loss is then ``sum_i w_i CE_i / sum_i w_i n_i`` over the whole
        accumulated step (and all devices), so weights averaging N/k do not rescale the learning rate."""

        token_counts: dict[str, int]

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "weight" not in self._signature_columns:  # keep the column through remove_unused_columns
                self._signature_columns = [*self._signature_columns, "weight"]

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            counts = getattr(self, "token_counts", None) or {"tokens": 0, "supervised": 0}
            for batch in batches:
                counts["tokens"] += int(batch["attention_mask"].sum())
                counts["supervised"] += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            self.token_counts = counts
            if batches and "weight" in batches[0]:
                # Replaces the Trainer's plain token count with the weighted one, reduced like it across ranks.
                num_items = sum(weighted_token_count(b["labels"], b["weight"]) for b in batches).to(device)
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    num_items = self.accelerator.gather(num_items).sum()
            return batches, num_items

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weights = inputs.pop("weight", None)
            if weights is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs.pop("labels")
            outputs = model(**inputs, use_cache=False)
            total = token_loss_sum(outputs.logits, labels, weights)
            if num_items_in_batch is None:  # evaluation: this micro-batch alone
                num_items_in_batch = weighted_token_count(labels, weights)
            loss = total / torch.as_tensor(num_items_in_batch).clamp(min=torch.finfo(torch.float32).tiny)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # DDP averages gradients over ranks while num_items counts every rank's tokens (as in Trainer).
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return WeightedSFTTrainer


def _sft_config(config: FinetuneConfig, num_examples: int, scratch: str, progress: bool):
    import trl

    total = config.max_steps or _steps_per_epoch(num_examples, config) * config.epochs
    return trl.SFTConfig(
        output_dir=scratch,
        learning_rate=config.lr,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        num_train_epochs=float(config.epochs or 1),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        lr_scheduler_type="linear",
        warmup_steps=round(config.warmup_ratio * total),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm if config.max_grad_norm is not None else 0.0,
        optim="adamw_torch",
        seed=config.seed,
        data_seed=config.seed,
        # Without a GPU the trainer only allows bf16 autocast when told it runs on the CPU on purpose.
        use_cpu=not torch.cuda.is_available(),
        bf16=config.precision == "bf16-autocast",
        fp16=False,
        # transformers 5 renamed gradient_checkpointing*; the old names warn (FutureWarning) on every fine-tune
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        # The rows are tokenized and truncated already (data.tokenize_rows); TRL must not cut them again.
        max_length=None,
        packing=False,
        padding_free=False,
        assistant_only_loss=False,  # TRL's flag needs conversational rows; the assistant_masks column does it
        completion_only_loss=False,
        dataset_num_proc=None,
        # No evaluation, saving, integrations or worker processes: the trainer only trains.
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_strategy="steps",
        logging_steps=1,
        logging_nan_inf_filter=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not progress,
    )


def _loss_bar():
    """transformers' progress bar (steps done / total, time left) showing the latest loss, without its
    ``on_log`` printing every log dict on a line of its own."""
    import transformers

    class LossBar(transformers.ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if state.is_world_process_zero and self.training_bar is not None and loss is not None:
                self.training_bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    return LossBar()


def _steps_per_epoch(num_examples: int, config: FinetuneConfig) -> int:
    batches = math.ceil(num_examples / config.batch_size)
    return math.ceil(batches / config.grad_accum)


def _build_trainer(model, tokenizer, rows, sample_weights, config, scratch, progress, log_every):
    import copy

    import peft
    import transformers
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    # SFTTrainer sets pad tokens on its processing class; the caller's tokenizer stays as it was.
    processing = copy.deepcopy(tokenizer)
    if processing.pad_token is None:
        processing.pad_token = processing.eos_token
    inner = DataCollatorForLanguageModeling(pad_token_id=pad_id(processing))

    def collate(features: list[dict]) -> dict:
        batch = inner([{k: v for k, v in f.items() if k != "weight"} for f in features])
        if "weight" in features[0]:
            batch["weight"] = torch.tensor([float(f["weight"]) for f in features], dtype=torch.float32)
        return batch

    class _Progress(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            if not math.isfinite(loss):
                raise NumericalError(f"non-finite training loss at step {state.global_step}: {loss}")
            if log_every and state.global_step % log_every == 0:
                logger.info(
                    "finetune step %d/%d loss %.4f lr %.2e",
                    state.global_step,
                    state.max_steps,
                    loss,
                    logs.get("learning_rate", float("nan")),
                )

    peft_config = None
    if config.lora_rank is not None:
        peft_config = peft.LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha or 2 * config.lora_rank,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    # Gradients left on the model by earlier work (a warm-up, a gradient pass) must not leak into step 0.
    model.zero_grad(set_to_none=True)
    with _quiet_datasets():
        trainer = _trainer_class()(
            model=model,
            args=_sft_config(config, len(rows), scratch, progress),
            data_collator=collate,
            train_dataset=sft_dataset(rows, sample_weights),
            processing_class=processing,
            peft_config=peft_config,
            callbacks=[_Progress()],
        )
    if not progress:  # with the bar off, the trainer would print every log dict to stdout instead
        trainer.remove_callback(transformers.PrinterCallback)
    else:  # one bar with the loss on it, not a printed log dict per step under the bar
        trainer.remove_callback(transformers.ProgressCallback)
        trainer.add_callback(_loss_bar())
    trainer.token_counts = {"tokens": 0, "supervised": 0}
    return trainer


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    # The trainer's dataset preparation shows a progress bar per map(); a run shows one bar, the trainer's.
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _disable_checkpointing(model: torch.nn.Module) -> None:
    # The trainer turns checkpointing on and leaves it on; the model is used for evaluation afterwards.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()


def _merge_lora(model: torch.nn.Module, config: FinetuneConfig) -> torch.nn.Module:
    if config.lora_rank is None:
        return model
    # Merging writes the adapters into the base weights (in place), so the saved dir is a plain HF model.
    return model.merge_and_unload()


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
        bad = next(
            (
                t
                for t, (i, lab) in enumerate(zip(row["input_ids"], row["labels"]))
                if lab not in (IGNORE_INDEX, i)
            ),
            None,
        )
        if bad is not None:
            # The trainer rebuilds labels from a 0/1 mask over input_ids, so other label values cannot survive.
            raise DataError(
                f"sample '{sid}': label at position {bad} is neither -100 nor the input id there "
                "(labels must mark which input tokens carry loss)"
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
    if not any(resolved.values()):
        raise DataError("FinetuneConfig.use_weights is set but every sample weight is 0")
    return resolved


def _cache_key(config: FinetuneConfig, rows: list[dict], weights: dict[str, float] | None, base: str) -> str:
    return f"{ENGINE}-{config.fingerprint()}-{data_hash(rows, weights)}-{base}"


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
    if unexpected or [k for k in missing if k not in tied_keys(model)]:
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
        extra={
            "log_history": summary.get("log_history", []),
            "precision": summary["config"]["precision"],
            "trl": summary.get("trl_version", "?"),
        },
    )
