"""What every selection method receives and returns: :class:`SelectionContext` and :class:`SelectionReport`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from idistill_core.pipeline.gradients import warmup_preconditioner
from idistill_core.pipeline.selection import SelectionOutcome, cap_options


@dataclass
class SelectionContext:
    """One selection's inputs: the model, the tokenized pool and targets, the budget and the recipe, plus where
    the shared artefacts live and how to report. Methods read what they need and ignore the rest."""

    model: Any
    tokenizer: Any
    model_fingerprint: str
    pool: Any
    """Tokenized pool examples (``datasets.Dataset`` with ``sample_id``, ``input_ids``, ``labels``)."""
    targets: Any
    """Tokenized target (dev) examples, same columns."""
    budget: int
    recipe: Any
    """The resolved ``pipeline.recipe.SelectionRecipe`` (no ``auto`` precision left)."""
    store_uri: str | Path | None = None
    """LanceDB folder of the embeddings (``id`` only)."""
    store_table: str = "embeddings"
    progress: bool = False
    backend: Any = None
    """``backends.BackendConfig`` for embeddings and landmark gradients (None: here)."""
    source: Any = None
    """``backends.ModelSource`` the backend's workers load."""
    commit_every: int = 256
    on_commit: Callable[[int, int], None] | None = None
    source_of: Mapping[str, str] | None = None
    """Pool sample id → source (needed for ``per_source_cap``)."""
    target_subtasks: Mapping[str, str] | None = None
    """Target sample id → sub-task (LESS's max over sub-tasks; None = one sub-task)."""
    pool_features: np.ndarray | None = None
    """``rds``: the pool's precomputed RDS+ features ``(N, H)`` in pool order (the shared ``rds_features``)."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def pool_ids(self) -> list[str]:
        return list(self.pool["sample_id"])

    def caps(self, ids) -> dict:
        """``select_samples`` keywords for the recipe's per-source cap over ``ids``."""
        return cap_options(ids, self.recipe.per_source_cap, self.source_of)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[stage]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def gradient_model(self):
        """``(model, preconditioner)`` whose gradients the recipe scores (a warmed-up copy for ``adam``)."""
        if self.recipe.optimizer != "adam":
            return self.model, None
        import copy

        with self.timed("warmup"):
            warm = copy.deepcopy(self.model)  # the caller's model stays as it was
            recipe = self.recipe
            return warm, warmup_preconditioner(
                warm, self.tokenizer, self.pool, recipe.warmup, recipe.gradients.param_subset, self.progress
            )

    def report(self, outcome: SelectionOutcome, **extra) -> SelectionReport:
        sizes = {"pool": len(self.pool), "targets": len(self.targets), "budget": self.budget}
        sizes.update(extra.pop("sizes", {}))
        return SelectionReport(outcome, self.timings, sizes, **extra)


@dataclass
class SelectionReport:
    outcome: SelectionOutcome
    timings: dict[str, float]
    sizes: dict[str, int]
    fidelity: float | None = None
    notes: list[str] = field(default_factory=list)
    precision: dict[str, str] = field(default_factory=dict)
    """Resolved compute precision per step, with the reason (``precision.PrecisionDecision.summary``)."""
    propagation: str | None = None
    """The kernel, bandwidth and ridge the propagation used (chosen by CV or fixed), one line."""
    kernel_selection: object | None = None
    """``kernel_select.KernelSelection`` when the propagate config had ``auto`` fields."""
