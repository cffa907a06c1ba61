"""idistill_core: Influence Distillation (arXiv 2505.19051) as a plain PyTorch library, no Dagster.

The steps of the paper, one module each: ``embed`` (JVP embeddings), ``gradients`` (landmark/target gradients),
``warmup`` (Adam preconditioning), ``influence`` (first/second order, the QP), ``propagate`` (kernel ridge),
``select`` (weights → subset); then ``train`` and ``evaluate``. ``pipeline`` composes them; ``store`` keeps
embeddings in LanceDB; ``data``/``builtin``/``models`` bring pools, targets and models.
"""

from idistill_core.errors import (
    ConfigError,
    DataError,
    IdistillError,
    ModelError,
    NumericalError,
    StoreError,
)
from idistill_core.models.loading import LoadedModel, load_model
from idistill_core.pipeline.landmarks import choose_landmarks
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.pipeline.run import run_selection
from idistill_core.steps.embed import EmbedConfig, embed_samples
from idistill_core.steps.gradients import GradientConfig, collect_gradients
from idistill_core.steps.influence import first_order
from idistill_core.steps.propagate import KernelRidge, PropagateConfig
from idistill_core.steps.qp import qp_weights
from idistill_core.steps.second_order import second_order_terms
from idistill_core.steps.select import round_robin, select_top_k
from idistill_core.steps.warmup import WarmupConfig, adam_preconditioner, warmup
from idistill_core.store.lance import EmbeddingStore
from idistill_core.training.evaluate import EvalConfig, evaluate
from idistill_core.training.finetune import FinetuneConfig, finetune

__all__ = [
    "ConfigError",
    "DataError",
    "EmbedConfig",
    "EmbeddingStore",
    "EvalConfig",
    "FinetuneConfig",
    "GradientConfig",
    "IdistillError",
    "KernelRidge",
    "LoadedModel",
    "ModelError",
    "NumericalError",
    "PropagateConfig",
    "SelectionRecipe",
    "StoreError",
    "WarmupConfig",
    "adam_preconditioner",
    "choose_landmarks",
    "collect_gradients",
    "embed_samples",
    "evaluate",
    "finetune",
    "first_order",
    "load_model",
    "qp_weights",
    "round_robin",
    "run_selection",
    "second_order_terms",
    "select_top_k",
    "warmup",
]
