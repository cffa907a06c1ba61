"""Selection methods, one module each, registered by file name: ``id`` (Influence Distillation), ``exact``
(every pool sample a landmark), and the baselines ``rds`` (RDS+), ``less`` (LESS), ``random`` and ``midppl``.

Each module defines ``select(ctx: SelectionContext) -> SelectionReport`` (:mod:`idistill_core.methods.base`)
and may define ``check(ctx)``, which refuses a bad configuration before any work. Adding a method is adding a
file here; ``SelectionRecipe.method`` accepts every module name listed in :data:`METHODS`.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

NOT_METHODS = frozenset({"base"})
METHODS: tuple[str, ...] = tuple(
    sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name not in NOT_METHODS)
)
"""Every method name, from the module files of this package (no module is imported to list them)."""


def get(name: str) -> ModuleType:
    """The module of method ``name`` (it has ``select(ctx)``, maybe ``check(ctx)``)."""
    from idistill_core.errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"unknown selection method {name!r}; choose one of {', '.join(METHODS)}.")
    return importlib.import_module(f"{__name__}.{name}")
