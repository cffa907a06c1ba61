"""idistill_core: Influence Distillation (arXiv 2505.19051) as a plain PyTorch library, no Dagster."""

from idistill_core.errors import (
    ConfigError,
    DataError,
    IdistillError,
    ModelError,
    NumericalError,
    StoreError,
)

__all__ = ["ConfigError", "DataError", "IdistillError", "ModelError", "NumericalError", "StoreError"]
