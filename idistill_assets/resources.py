"""Resources: where things live (the settings profile) and the loaded model, shared by every asset."""

from __future__ import annotations

import logging
from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr

from idistill_core.settings import Settings, load_settings
from idistill_core.store import EmbeddingStore


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

    def load_model(self, attn_implementation: str | None = None):
        """The base model (``LoadedModel``), loaded once per run and per attention implementation."""
        from idistill_core.models import load_model

        key = attn_implementation or "default"
        if key not in self._model_cache:
            logging.getLogger("idistill").info("loading model %s (%s attention)", self.settings.model, key)
            self._model_cache[key] = load_model(
                self.settings.model, attn_implementation=attn_implementation, cache_dir=self.settings.cache_dir
            )
        return self._model_cache[key]

    def precision(self, requested: str):
        """``requested`` (``auto``/``float32``/``bfloat16``) resolved on the base model (one probe per run)."""
        from idistill_core.precision import PrecisionResolver

        if self._resolver is None:
            self._resolver = PrecisionResolver()
        return self._resolver.resolve_for_model(requested, self.load_model().model)

    def recipe(self):
        """The profile's recipe with ``auto`` precisions resolved for this machine (fingerprints use it)."""
        import dataclasses

        r = self.settings.recipe
        embed = dataclasses.replace(r.embed, dtype=self.precision(r.embed.dtype).dtype)
        gradients = dataclasses.replace(r.gradients, dtype=self.precision(r.gradients.dtype).dtype)
        return dataclasses.replace(r, embed=embed, gradients=gradients)

    def store(self) -> EmbeddingStore:
        """The embedding table of the base model under the profile's (resolved) embedding recipe."""
        from idistill_core.pipeline import open_store

        s = self.settings
        loaded = self.load_model()
        return open_store(s.lancedb_uri, s.embeddings_table, loaded.fingerprint, self.recipe(), loaded.model.config.hidden_size)

    def artifact_dir(self, *parts: str) -> Path:
        path = self.settings.artifacts.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path
