"""idistill_core: Influence Distillation (arXiv 2505.19051) as a plain PyTorch library, no Dagster.

The steps of the paper, one module each: ``embed`` (JVP embeddings), ``gradients`` (landmark/target gradients),
``warmup`` (Adam preconditioning), ``influence`` (first/second order, the QP), ``propagate`` (kernel ridge),
``select`` (weights → subset); then ``train`` and ``evaluate``. ``pipeline`` composes them; ``store`` keeps
embeddings in LanceDB; ``data``/``builtin``/``models`` bring pools, targets and models.
"""

from idistill_core.embed import EmbedConfig, embed_samples
from idistill_core.errors import (
    ConfigError,
    DataError,
    IdistillError,
    ModelError,
    NumericalError,
    StoreError,
)
from idistill_core.evaluate import EvalConfig, evaluate
from idistill_core.gradients import GradientConfig, collect_gradients
from idistill_core.influence import first_order, qp_weights, second_order_terms
from idistill_core.models import LoadedModel, load_model
from idistill_core.pipeline import SelectionRecipe, choose_landmarks, run_selection
from idistill_core.propagate import KernelRidge, PropagateConfig
from idistill_core.select import round_robin, select_top_k
from idistill_core.store import EmbeddingStore
from idistill_core.train import FinetuneConfig, finetune
from idistill_core.warmup import WarmupConfig, adam_preconditioner, warmup

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
