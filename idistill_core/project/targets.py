"""Target registry: one YAML file per target task, validated before anything runs.

A target file ``targets/<name>.yaml``::

    name: arith                    # must equal the file stem; [a-z0-9_-], used as the Dagster partition key
    description: GSM-like word problems
    metric: em-number              # em-number | squad | mc | nll
    dev: builtin/targets/arith/dev.jsonl    # target examples used for selection (relative to a data root)
    test: builtin/targets/arith/test.jsonl  # held-out examples used for evaluation
    format: auto                   # loader format (auto | chat | gsm8k | squad | mmlu | tulu)
    budget: 100                    # selected subset size k
    method: id                     # id | exact | rds | random | midppl | less
    order: first                   # first | second
    aggregate: mean                # mean | rr
    finetune: true                 # also fine-tune and evaluate on the subset
    lm_eval: {task: gsm8k-local}   # optional: also score with lm-evaluation-harness (local test file, no hub)
    evaluate: true                 # evaluate the fine-tuned models (needs finetune: true)
    per_source_cap: 40             # optional: at most this many selected samples from one pool source
                                   # (overrides the profile's recipe.per_source_cap)

The optimizer (GD or Adam preconditioning) is a property of the shared landmark gradients, so it is set once in
the settings profile (``recipe.optimizer``), not per target.

Paths may not escape the configured data roots (no absolute paths outside them, no ``..`` tricks).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from idistill_core.errors import ConfigError
from idistill_core.store.hashing import file_hash, stable_hash

Spec = TypeVar("Spec")

METRICS = ("em-number", "squad", "mc", "nll")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_REQUIRED = ("name", "metric", "dev", "test", "budget")
_OPTIONAL = {
    "description": "",
    "format": "auto",
    "method": "id",
    "order": "first",
    "aggregate": "mean",
    "finetune": True,
    "lm_eval": None,
    "evaluate": True,
    "per_source_cap": None,
}
LM_EVAL_TASKS = ("gsm8k-local",)
"""Harness task templates a target may name (``evaluate.lm_eval_task_config``)."""


@dataclass(frozen=True)
class TargetSpec:
    name: str
    metric: str
    dev: Path
    test: Path
    budget: int
    description: str = ""
    format: str = "auto"
    method: str = "id"
    order: str = "first"
    aggregate: str = "mean"
    finetune: bool = True
    lm_eval: str | None = None
    """lm-evaluation-harness task template scored beside ``metric`` (None: our metric only)."""
    evaluate: bool = True
    per_source_cap: int | None = None
    """At most this many selected samples from one pool source (None: the profile recipe's cap, if any)."""
    source_file: Path | None = None

    def version(self) -> str:
        """Hash of the spec and of its dev/test files' contents: changes when anything the target uses changes."""
        # an unset cap is left out so that specs written before the field existed keep their version
        fields = {
            k: str(v) for k, v in asdict(self).items()
            if k != "source_file" and not (k == "per_source_cap" and v is None)
        }
        files = {p: (file_hash(p) if Path(p).exists() else "missing") for p in (self.dev, self.test)}
        return stable_hash({"spec": fields, "files": {str(k): v for k, v in files.items()}}, 16)


def _resolve(path_value: object, field_name: str, source: Path, data_roots: list[Path]) -> Path:
    if not isinstance(path_value, str) or not path_value.strip():
        raise ConfigError(f"{source}: field '{field_name}' must be a non-empty path string; got {path_value!r}.")
    raw = Path(path_value)
    candidates = [raw] if raw.is_absolute() else [root / raw for root in data_roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        for root in data_roots:
            if resolved.is_relative_to(root.resolve()):
                return resolved
    roots = ", ".join(str(r) for r in data_roots)
    raise ConfigError(f"{source}: field '{field_name}' = {path_value!r} escapes the data roots ({roots}).")


def read_named_yaml(path: Path, kind: str, required, optional) -> tuple[dict, str]:
    """The fields of a ``<name>.yaml`` registry file (target or mix) and its checked name: a mapping with every
    ``required`` field, nothing outside ``required``/``optional``, and ``name`` a partition key equal to the stem."""
    from idistill_core.project.settings import read_yaml

    raw = read_yaml(path, f"{kind} file")  # missing, a folder, not UTF-8, invalid YAML: one line with the position
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of fields, got {type(raw).__name__}.")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ConfigError(f"{path}: missing required field(s) {', '.join(missing)}.")
    unknown = sorted(str(k) for k in set(raw) - set(required) - set(optional))
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)}.")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{path}: field 'name' = {name!r} must match [a-z0-9][a-z0-9_-]* (it is a partition key).")
    if name != path.stem:
        raise ConfigError(f"{path}: field 'name' = {name!r} must equal the file name stem {path.stem!r}.")
    return raw, name


def load_target_spec(path: str | Path, data_roots: list[str | Path]) -> TargetSpec:
    """Parse and validate one target YAML; paths are resolved inside ``data_roots``."""
    path = Path(path)
    roots = [Path(r) for r in data_roots]
    raw, name = read_named_yaml(path, "target", _REQUIRED, _OPTIONAL)
    metric = raw["metric"]
    if metric not in METRICS:
        raise ConfigError(f"{path}: field 'metric' = {metric!r} is unknown; use one of {', '.join(METRICS)}.")
    budget = raw["budget"]
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise ConfigError(f"{path}: field 'budget' must be a positive integer; got {budget!r}.")
    values = {**_OPTIONAL, **{k: raw[k] for k in _OPTIONAL if k in raw}}
    choices = {
        "method": ("id", "exact", "rds", "random", "midppl", "less"),
        "order": ("first", "second"),
        "aggregate": ("mean", "rr"),
    }
    for field_name, allowed in choices.items():
        if values[field_name] not in allowed:
            raise ConfigError(
                f"{path}: field '{field_name}' = {values[field_name]!r} is unknown; use one of {', '.join(allowed)}."
            )
    for flag in ("finetune", "evaluate"):
        if not isinstance(values[flag], bool):
            raise ConfigError(f"{path}: field '{flag}' must be true or false; got {values[flag]!r}.")
    from idistill_core.data.formats import FORMATS

    if not isinstance(values["format"], str) or values["format"] not in FORMATS:
        raise ConfigError(f"{path}: field 'format' = {values['format']!r} is unknown; use one of {', '.join(FORMATS)}.")
    if not isinstance(values["description"], str):
        raise ConfigError(f"{path}: field 'description' must be a string; got {values['description']!r}.")
    lm_eval = values["lm_eval"]
    if lm_eval is not None:
        if not isinstance(lm_eval, dict) or set(lm_eval) != {"task"} or lm_eval["task"] not in LM_EVAL_TASKS:
            raise ConfigError(
                f"{path}: field 'lm_eval' must be {{task: <one of {', '.join(LM_EVAL_TASKS)}>}}; got {lm_eval!r}."
            )
        lm_eval = lm_eval["task"]
    cap = check_cap(values["per_source_cap"], path)
    if cap is not None and values["method"] == "midppl":
        # midppl picks a perplexity band, not a ranking: it cannot honour a cap
        raise ConfigError(
            f"{path}: field 'per_source_cap' is not supported with method 'midppl' (it takes a perplexity band)."
        )
    return TargetSpec(
        name=name,
        metric=metric,
        dev=_resolve(raw["dev"], "dev", path, roots),
        test=_resolve(raw["test"], "test", path, roots),
        budget=budget,
        description=str(values["description"]),
        format=str(values["format"]),
        method=values["method"],
        order=values["order"],
        aggregate=values["aggregate"],
        finetune=values["finetune"],
        lm_eval=lm_eval,
        evaluate=values["evaluate"],
        per_source_cap=cap,
        source_file=path,
    )


def check_cap(value: object, source: Path) -> int | None:
    """A ``per_source_cap`` field: None or an integer >= 1 (a one-line error naming the file otherwise)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{source}: field 'per_source_cap' must be an integer >= 1; got {value!r}.")
    return value


def selection_cap(spec: TargetSpec, recipe_cap: int | None) -> int | None:
    """The per-source cap a target's selection uses: its own, else the profile recipe's.

    Raises:
        ConfigError: the profile sets a cap but the target's method cannot honour one.
    """
    cap = spec.per_source_cap if spec.per_source_cap is not None else recipe_cap
    if cap is not None and spec.method == "midppl":
        raise ConfigError(
            f"{spec.source_file}: per_source_cap={cap} (from the profile recipe) is not supported with method "
            "'midppl' (it takes a perplexity band)."
        )
    return cap


def load_registry(
    targets_dir: str | Path, data_roots: list[str | Path], errors: dict[str, str] | None = None
) -> dict[str, TargetSpec]:
    """All ``*.yaml`` targets in a folder, by name.

    An invalid file raises its one-line ConfigError; with ``errors`` it is skipped instead and its line recorded
    there under the file's stem (what the registry sensor reports as a failed check, never a crash).
    """
    return load_yaml_specs(Path(targets_dir), lambda path: load_target_spec(path, data_roots), errors)


def load_yaml_specs(folder: Path, load: Callable[[Path], Spec], errors: dict[str, str] | None) -> dict[str, Spec]:
    """``load`` every ``*.yaml``/``*.yml`` file of ``folder`` (none when it does not exist), by spec name; a file's
    ConfigError is raised, or with ``errors`` recorded under the file's stem and the file skipped."""
    if not folder.is_dir():
        return {}
    specs = {}
    for path in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")):
        try:
            spec = load(path)
        except ConfigError as error:
            if errors is None:
                raise
            errors[path.stem] = str(error)
            continue
        specs[spec.name] = spec
    return specs
