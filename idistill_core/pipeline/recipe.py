"""The selection recipe: every knob of a selection run except the budget (which belongs to the target).

One frozen dataclass shared by the CLI (``--profile`` and flags), the Dagster assets (the profile's ``recipe``
block) and :func:`idistill_core.pipeline.run.run_selection`; :func:`resolve_recipe` makes its ``auto``
precisions concrete before anything is fingerprinted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from idistill_core.errors import ConfigError
from idistill_core.methods import METHODS
from idistill_core.methods.less import LessConfig
from idistill_core.models.precision import PrecisionResolver
from idistill_core.steps.embed import EmbedConfig
from idistill_core.steps.gradients import GradientConfig
from idistill_core.steps.landmarks import LandmarkConfig
from idistill_core.steps.propagate import PropagateConfig
from idistill_core.steps.warmup import WarmupConfig
from idistill_core.store.hashing import config_fingerprint


@dataclass(frozen=True)
class SelectionRecipe:
    """Every knob of a selection run except the budget (which belongs to the target)."""

    method: Literal["id", "exact", "rds", "random", "midppl", "less"] = "id"
    """`id` = Influence Distillation (landmarks + propagation); `exact` = every pool sample is a landmark (no
    propagation; the reference ID approximates); the rest are baselines (`less` = LESS itself, see `less`)."""
    num_landmarks: int = 64
    """L: pool samples whose exact gradients are computed (paper default 4096 for 200k pools)."""
    num_holdout: int = 16
    """Extra pool samples with exact gradients, never used as landmarks: fidelity (Spearman ρ) is measured on them."""
    order: Literal["first", "second"] = "first"
    """`first`: rank by p (paper §1.5, the released code); `second`: the QP with the Hessian term (paper §1.4)."""
    optimizer: Literal["gd", "adam"] = "gd"
    """`adam` preconditions landmark gradients with a warmed-up AdamW state (paper §1.6); needs a warm-up."""
    aggregate: Literal["mean", "rr"] = "mean"
    """`mean`: the paper's mean target gradient (top-k of the mean score); `rr`: the released code's round-robin
    over target samples."""
    max_length: int = 256
    """Tokens per sample; longer samples are truncated and counted (or refused, see `on_overflow`)."""
    on_overflow: Literal["truncate", "error"] = "truncate"
    """`truncate` keeps the first `max_length` tokens of a longer sample and counts it; `error` refuses the run,
    naming the sample."""
    lr: float = 1e-4
    """η of the step the second-order model predicts (only used with order='second'): the real step's learning
    rate, at the scale of the real (preconditioned) gradients."""
    hessian_targets: int | None = 2
    """Target samples whose Hessian the second order uses (a seeded uniform sample of the dev set; None: all).
    Each keeps its double-backward graph alive for every landmark (~0.6 GiB per 100-token sample on SmolLM2-135M),
    so this bounds the second order's memory; the gradient term always uses every target sample."""
    hessian_proj_dim: int | None = 32768
    """Rows of each of the two sketches of the second order's ``Q`` pairs (its ``p`` and diagonal are exact);
    the pairs' error falls like ``√(L/P)``, reported per run as ``q_noise``. None: the gradient sketch's size."""
    batch_size: int = 8
    """Samples per forward batch for embeddings and forward-only baselines."""
    seed: int = 0
    """Landmark choice, round-robin order and random baseline."""
    per_source_cap: int | None = None
    """At most this many selected samples from any one pool source (top-k and round-robin both honour it)."""
    landmarks: LandmarkConfig = field(default_factory=LandmarkConfig)
    """Which pool samples become landmarks (`landmarks.strategy`; `random` is the paper's)."""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    gradients: GradientConfig = field(default_factory=GradientConfig)
    propagate: PropagateConfig = field(default_factory=PropagateConfig)
    center: bool = True
    """First order: centre landmark, held-out and target gradients on the landmarks' mean unit gradient (the
    pool's mean for `exact`) and re-normalise before the inner products. Removes the component every gradient
    shares, which makes short-answer samples score high on every target; on the real benchmark it raised exact
    selection's on-target share on every long-answer target and lowered none (docs/DESIGN.md). Not the paper's
    objective; `false` gives it back. Second order always uses the real, uncentred step."""
    refine_landmarks: int = 16
    """First order: per target, this many extra landmarks nearest its dev samples in the embedding space, with
    exact gradients (``pipeline.refinement``); 0 turns it off. A new target costs these gradients, not a rebuild."""
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    less: LessConfig = field(default_factory=LessConfig)
    """LESS's own warm-up, feature and projection settings (only used with method='less')."""

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= 2**32 - 1:
            raise ConfigError(f"SelectionRecipe.seed must be in [0, 2**32 - 1]; got {self.seed}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"SelectionRecipe.lr must be finite and > 0; got {self.lr}")
        if self.method not in METHODS:
            raise ConfigError(f"SelectionRecipe.method must be one of {', '.join(METHODS)}; got {self.method!r}.")
        if self.order not in ("first", "second"):
            raise ConfigError(f"SelectionRecipe.order must be 'first' or 'second'; got {self.order!r}.")
        if self.optimizer not in ("gd", "adam"):
            raise ConfigError(f"SelectionRecipe.optimizer must be 'gd' or 'adam'; got {self.optimizer!r}.")
        if self.aggregate not in ("mean", "rr"):
            raise ConfigError(f"SelectionRecipe.aggregate must be 'mean' or 'rr'; got {self.aggregate!r}.")
        if self.num_landmarks <= 0:
            raise ConfigError(f"SelectionRecipe.num_landmarks must be > 0; got {self.num_landmarks}.")
        if self.num_holdout < 0:
            raise ConfigError(f"SelectionRecipe.num_holdout must be >= 0; got {self.num_holdout}.")
        if self.order == "second" and self.aggregate == "rr":
            raise ConfigError("SelectionRecipe.order='second' needs aggregate='mean' (the QP uses the mean target loss).")
        if self.on_overflow not in ("truncate", "error"):
            raise ConfigError(f"SelectionRecipe.on_overflow must be 'truncate' or 'error'; got {self.on_overflow!r}.")
        if self.max_length <= 0 or self.batch_size <= 0:
            raise ConfigError("SelectionRecipe.max_length and batch_size must be > 0.")
        if self.refine_landmarks < 0:
            raise ConfigError(f"SelectionRecipe.refine_landmarks must be >= 0; got {self.refine_landmarks}")
        if self.per_source_cap is not None and self.per_source_cap < 1:
            raise ConfigError(f"SelectionRecipe.per_source_cap must be >= 1; got {self.per_source_cap}.")
        if self.per_source_cap is not None and self.method == "midppl":
            raise ConfigError("SelectionRecipe.per_source_cap is not supported with method='midppl' (it takes a "
                              "perplexity band, not a ranking).")
        if self.hessian_proj_dim is not None and self.hessian_proj_dim < 1:
            raise ConfigError(f"SelectionRecipe.hessian_proj_dim must be >= 1 or null; got {self.hessian_proj_dim}.")
        if self.hessian_targets is not None and self.hessian_targets < 1:
            raise ConfigError(f"SelectionRecipe.hessian_targets must be >= 1 or null; got {self.hessian_targets}.")

    def embed_fingerprint(self, model_fingerprint: str) -> str:
        return config_fingerprint(self.embed) + "-" + model_fingerprint[:8] + f"-len{self.max_length}"


def resolve_recipe(recipe: SelectionRecipe, model, resolver: PrecisionResolver | None = None
                   ) -> tuple[SelectionRecipe, dict[str, str]]:
    """``recipe`` with every ``auto`` precision made concrete for ``model``'s device, and one line per decision.

    Done before anything is fingerprinted (embedding store, gradient shards), so results computed in different
    dtypes never share a key.
    """
    import dataclasses

    resolver = resolver or PrecisionResolver()
    embed, embed_decision = recipe.embed.resolved(model, resolver)
    grad_decision = resolver.resolve_for_model(recipe.gradients.dtype, model, workload="gradients")
    gradients = dataclasses.replace(recipe.gradients, dtype=grad_decision.dtype)
    lines = {"embeddings": embed_decision.summary(), "gradients": grad_decision.summary()}
    return dataclasses.replace(recipe, embed=embed, gradients=gradients), lines
