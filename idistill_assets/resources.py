"""Resources: where things live (the settings profile), the loaded model, and versioned artefact folders.

Every asset writes its files into a fresh staging folder and `commit`s it: the folder is renamed to
``<artifacts>/<asset>[/<partition>]/<version>/`` where the version is the hash of the files written (the asset's
Dagster data version), and ``current.json`` next to it points readers at the newest one. A re-materialization
therefore never overwrites what an earlier materialization's ``dagster/uri`` points at; old versions go only when
the maintenance job applies ``orchestration.keep_versions``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr

from idistill_core.errors import ConfigError
from idistill_core.project.settings import Settings, load_settings
from idistill_core.store import artifacts
from idistill_core.store.hashing import file_hash, stable_hash
from idistill_core.store.lance import EmbeddingStore

CURRENT = "current.json"
DEVICE_POOL = "devices"
WRITER_POOL = "lancedb_writer"


def device_count() -> int:
    """CUDA devices visible to this process (0 on a CPU-only machine)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install counts as no device
        return 0


def device_slots(settings: Settings) -> int:
    """Heavy steps that may run at once: the profile's `orchestration.device_slots`, else one per GPU, else 1."""
    return settings.orchestration.device_slots or max(1, device_count())


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def instance_yaml(settings: Settings) -> str:
    """dagster.yaml of the project's instance: runs queued at most `device_slots` at a time, op-level pools of
    the same size (the writers' pool is pinned to 1 by `configure_instance`); no telemetry, no onboarding dialog."""
    slots = device_slots(settings)
    return (
        "telemetry:\n  enabled: false\n"
        # no "Join the Dagster community" dialog over the asset graph on a fresh instance (Dagster's `nux` switch)
        "nux:\n  enabled: false\n"
        f"concurrency:\n  runs:\n    max_concurrent_runs: {slots}\n"
        f"  pools:\n    default_limit: {slots}\n    granularity: op\n"
        "run_monitoring:\n  enabled: true\n  free_slots_after_run_end_seconds: 60\n"
    )


def write_instance_config(dagster_home: Path, settings: Settings) -> Path:
    """Write (or refresh) ``dagster_home/dagster.yaml`` for this profile; returns its path."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    path = dagster_home / "dagster.yaml"
    text = instance_yaml(settings)
    if not path.exists() or path.read_text() != text:
        artifacts.write_with(path, lambda tmp: Path(tmp).write_text(text))
    return path


def configure_instance(instance: dg.DagsterInstance, settings: Settings) -> None:
    """Pool limits the yaml cannot say per pool: one LanceDB writer at a time, `device_slots` heavy steps."""
    instance.event_log_storage.set_concurrency_slots(WRITER_POOL, 1)
    instance.event_log_storage.set_concurrency_slots(DEVICE_POOL, device_slots(settings))


def current_dir(settings: Settings, asset: str, partition: str | None = None) -> Path:
    """The folder of the latest committed version of ``asset`` (in ``partition``) under a profile's artefacts."""
    pointer = settings.artifacts.joinpath(asset, *([partition] if partition else []), CURRENT)
    if not pointer.exists():
        where = f"{asset}[{partition}]" if partition else asset
        raise ConfigError(f"{where} has no materialized version under {pointer.parent}; materialize it first.")
    return Path(json.loads(pointer.read_text())["path"])


class IdistillResource(dg.ConfigurableResource):
    """The project settings (a YAML profile) plus lazily loaded, per-run cached model objects."""

    profile: str = "profiles/default.yaml"
    home: str | None = None

    _model_cache: dict = PrivateAttr(default_factory=dict)
    _settings: Settings | None = PrivateAttr(default=None)
    _resolver: object = PrivateAttr(default=None)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.profile, self.home)
        return self._settings

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Torch threads follow the cores this run was given: the usable cores split among the runs the
        instance lets run at once (oversubscribed threads made two runs on 2 cores ~10x slower each)."""
        import torch

        try:
            slots = device_slots(self.settings)
        except ConfigError:  # a bad profile fails in the first step, with its one-line error, not here
            return
        threads = max(1, usable_cores() // slots)
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            threads = min(threads, int(os.environ["OMP_NUM_THREADS"]))
        torch.set_num_threads(threads)

    def load_model(self, attn_implementation: str | None = None):
        """The base model (``LoadedModel``), loaded once per run and per attention implementation."""
        from idistill_core.models.loading import load_model

        key = attn_implementation or "default"
        if key not in self._model_cache:
            logging.getLogger("idistill").info("loading model %s (%s attention)", self.settings.model, key)
            self._model_cache[key] = load_model(
                self.settings.model,
                attn_implementation=attn_implementation,
                cache_dir=self.settings.cache_dir,
            )
        return self._model_cache[key]

    def precision(self, requested: str, workload: str = "forward"):
        """``requested`` (``auto``/``float32``/``bfloat16``) resolved on the base model for ``workload``
        (``forward`` or ``gradients``; one probe per run and workload)."""
        from idistill_core.models.precision import PrecisionResolver

        if self._resolver is None:
            self._resolver = PrecisionResolver()
        return self._resolver.resolve_for_model(requested, self.load_model().model, workload=workload)

    def recipe(self):
        """The profile's recipe with ``auto`` precisions resolved for this machine (fingerprints use it)."""
        import dataclasses

        r = self.settings.recipe
        embed = dataclasses.replace(r.embed, dtype=self.precision(r.embed.dtype).dtype)
        gradients = dataclasses.replace(r.gradients, dtype=self.precision(r.gradients.dtype, "gradients").dtype)
        return dataclasses.replace(r, embed=embed, gradients=gradients)

    def store(self) -> EmbeddingStore:
        """The embedding table of the base model under the profile's (resolved) embedding recipe."""
        from idistill_core.pipeline.embeddings import open_store

        s = self.settings
        loaded = self.load_model()
        return open_store(
            s.lancedb_uri, s.embeddings_table, loaded.fingerprint, self.recipe(), loaded.model.config.hidden_size
        )

    def artifact_dir(self, *parts: str) -> Path:
        path = self.settings.artifacts.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- versioned artefacts ------------------------------------------------------------------------------
    def versions_dir(self, asset: str, partition: str | None = None) -> Path:
        return self.artifact_dir(asset, *([partition] if partition else []))

    def staging(self, asset: str, partition: str | None = None) -> Path:
        """A fresh, empty folder to write one materialization's files into (then `commit` it)."""
        path = self.versions_dir(asset, partition) / f".staging-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    def commit(self, staging: Path, version: str | None = None) -> tuple[str, Path]:
        """Publish a staging folder as ``<version>/`` (default: hash of its files) and point `current` at it.

        An existing folder of the same version has the same content, so it is kept and the staging folder
        dropped: nothing an earlier materialization recorded is ever replaced."""
        if version is None:
            files = sorted(p for p in staging.rglob("*") if p.is_file())
            version = stable_hash({str(p.relative_to(staging)): file_hash(p) for p in files}, 16)
        final = staging.parent / version
        if final.exists():
            shutil.rmtree(staging)
        else:
            staging.rename(final)
        os.utime(final)  # the newest version by mtime is the current one for retention
        artifacts.write_json(staging.parent / CURRENT, {"version": version, "path": str(final)})
        return version, final

    def current(self, asset: str, partition: str | None = None) -> Path:
        """The folder of the latest committed version of ``asset`` (in ``partition``)."""
        return current_dir(self.settings, asset, partition)

    def prune_versions(self, keep: int | None = None) -> list[Path]:
        """Delete all but the newest ``keep`` version folders of every asset (partition); never the current."""
        keep = keep or self.settings.orchestration.keep_versions
        removed = []
        for pointer in sorted(self.settings.artifacts.rglob(CURRENT)):
            current = Path(json.loads(pointer.read_text())["path"])
            versions = [
                p
                for p in pointer.parent.iterdir()
                if p.is_dir()
                and not p.name.startswith(".")
                and not (p / CURRENT).exists()
                and not any(p.rglob(CURRENT))
            ]
            versions.sort(key=lambda p: p.stat().st_mtime, reverse=True)
            for old in [p for p in versions if p != current][max(0, keep - 1) :]:
                shutil.rmtree(old)
                removed.append(old)
            for leftover in pointer.parent.glob(".staging-*"):  # abandoned by a killed run (not a live one)
                if time.time() - leftover.stat().st_mtime > 6 * 3600:
                    shutil.rmtree(leftover, ignore_errors=True)
        return removed
