"""One call, pool + targets → selection: resolve the recipe, then hand over to the recipe's method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from idistill_core import methods
from idistill_core.backends import BackendConfig, ModelSource
from idistill_core.errors import ConfigError
from idistill_core.methods.base import SelectionContext, SelectionReport
from idistill_core.models.precision import PrecisionResolver
from idistill_core.pipeline.recipe import SelectionRecipe, resolve_recipe
from idistill_core.pipeline.selection import check_budget


def run_selection(
    model,
    tokenizer,
    model_fingerprint: str,
    pool_examples,
    target_examples,
    budget: int,
    recipe: SelectionRecipe,
    store_uri: str | Path,
    store_table: str = "embeddings",
    progress: bool = False,
    backend: BackendConfig | None = None,
    source: ModelSource | None = None,
    resolver: PrecisionResolver | None = None,
    commit_every: int = 256,
    on_commit: Callable[[int, int], None] | None = None,
    source_of: Mapping[str, str] | None = None,
    target_subtasks: Mapping[str, str] | None = None,
) -> SelectionReport:
    """Run ``recipe.method`` end to end on tokenized pool and target examples (``datasets.Dataset``).

    ``commit_every`` and ``on_commit`` go to the embedding pass (the only stage that commits); ``source_of``
    (sample id → pool source) is needed when the recipe sets ``per_source_cap``; ``target_subtasks`` (target id →
    sub-task) is used by `less` only (max over sub-tasks; None = one sub-task).
    """
    recipe, precision = resolve_recipe(recipe, model, resolver)
    check_budget(budget, len(pool_examples))
    if len(target_examples) == 0:
        raise ConfigError("the target set has no usable samples (all empty or without assistant tokens).")
    ctx = SelectionContext(
        model, tokenizer, model_fingerprint, pool_examples, target_examples, budget, recipe, store_uri, store_table,
        progress, backend, source, commit_every, on_commit, source_of, target_subtasks,
    )
    ctx.caps(ctx.pool_ids)  # a cap without sources is refused before any work
    method = methods.get(recipe.method)
    if hasattr(method, "check"):
        method.check(ctx)
    report = method.select(ctx)
    report.precision = precision
    return report
