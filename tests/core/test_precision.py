"""`auto` precision: capability gates, the measured probe decides, explicit requests win, one probe per key."""

import dataclasses

import pytest
import torch

from idistill_core.errors import ConfigError
from idistill_core.models import precision
from idistill_core.models.precision import PrecisionResolver, finetune_precision


@pytest.fixture
def native_cpu(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"fpu", "amx_bf16", "avx512_bf16"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")


def _fake_probe(monkeypatch, fp32_ms, bf16_ms):
    calls = []

    def probe(device, hidden, intermediate, tokens, repeats):
        calls.append((str(device), hidden, intermediate))
        return fp32_ms, bf16_ms

    monkeypatch.setattr(precision, "probe_ms", probe)
    return calls


def test_auto_picks_bfloat16_only_when_native_and_measured_faster(native_cpu, monkeypatch):
    _fake_probe(monkeypatch, 10.0, 3.0)
    decision = PrecisionResolver().resolve("auto", "cpu", (576, 1536))
    assert decision.dtype == "bfloat16" and decision.autocast
    assert (decision.fp32_ms, decision.bf16_ms) == (10.0, 3.0)
    assert "0.30x" in decision.summary() and "amx_bf16" in decision.capability


def test_auto_keeps_float32_when_native_bfloat16_is_not_faster(native_cpu, monkeypatch):
    _fake_probe(monkeypatch, 10.0, 9.0)  # above the 0.8 margin: timing noise must not flip to bf16
    decision = PrecisionResolver().resolve("auto", "cpu", (576, 1536))
    assert decision.dtype == "float32" and not decision.autocast
    assert "0.90x" in decision.reason


@pytest.mark.parametrize(
    "flags, level", [(set(), "AVX512"), ({"amx_bf16"}, "AVX2"), ({"avx512_bf16"}, "DEFAULT")]
)
def test_auto_is_float32_without_native_bfloat16_and_never_probes(monkeypatch, flags, level):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: level)
    calls = _fake_probe(monkeypatch, 10.0, 1.0)  # a probe would say bf16; the capability gate must win
    decision = PrecisionResolver().resolve("auto", "cpu", (576, 1536))
    assert decision.dtype == "float32" and decision.reason == "no native bfloat16"
    assert calls == []


def test_explicit_precisions_win_over_the_hardware(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: set())  # no bf16 at all
    calls = _fake_probe(monkeypatch, 1.0, 10.0)
    resolver = PrecisionResolver()
    assert resolver.resolve("bfloat16").dtype == "bfloat16"
    assert resolver.resolve("float32").dtype == "float32"
    assert resolver.resolve("bfloat16").reason == "explicit" and calls == []
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolver.resolve("half")


def test_resolver_probes_once_per_device_and_shape(native_cpu, monkeypatch):
    calls = _fake_probe(monkeypatch, 10.0, 3.0)
    resolver = PrecisionResolver()
    first = resolver.resolve("auto", "cpu", (576, 1536))
    assert resolver.resolve("auto", "cpu", (576, 1536)) is first
    resolver.resolve("auto", "cpu", (1024, 4096))
    assert calls == [("cpu", 576, 1536), ("cpu", 1024, 4096)]
    assert PrecisionResolver().resolve("auto", "cpu", (576, 1536)) is not first  # no hidden global cache


def test_real_probe_returns_positive_timings():
    fp32_ms, bf16_ms = precision.probe_ms(torch.device("cpu"), 32, 64, tokens=16, repeats=2)
    assert fp32_ms > 0 and bf16_ms > 0


def test_finetune_precision_maps_the_decision():
    bf16 = precision.PrecisionDecision("bfloat16", "auto", "r", "cpu", "c")
    fp32 = dataclasses.replace(bf16, dtype="float32")
    assert finetune_precision("auto", bf16) == "bf16-autocast"
    assert finetune_precision("auto", fp32) == "fp32"
    assert finetune_precision("fp32", bf16) == "fp32"


def test_recipe_resolution_makes_fingerprints_concrete(native_cpu, monkeypatch):
    from idistill_core.pipeline.recipe import SelectionRecipe, resolve_recipe
    from tests.conftest import tiny_llama

    _fake_probe(monkeypatch, 10.0, 3.0)
    model = tiny_llama(fork_rng=True, intermediate_size=8192)  # an MLP big enough to be probed
    recipe = SelectionRecipe()
    resolved, lines = resolve_recipe(recipe, model, PrecisionResolver())
    assert recipe.embed.dtype == "auto" and resolved.embed.dtype == "bfloat16"
    assert resolved.gradients.dtype == recipe.gradients.dtype  # float32 by default, explicit
    assert resolved.embed_fingerprint("m" * 8) != recipe.embed_fingerprint("m" * 8)
    assert lines["embeddings"].startswith("bfloat16 (auto:")


def test_auto_keeps_float32_for_shapes_too_small_to_time(native_cpu, monkeypatch):
    # A tiny model's probe takes microseconds; noise there must never flip runs between dtypes.
    calls = _fake_probe(monkeypatch, 0.02, 0.001)
    decision = PrecisionResolver().resolve("auto", "cpu", (32, 64))
    assert decision.dtype == "float32" and "too small" in decision.reason
    assert calls == []  # decided from the shapes: no timing, so no run-to-run flip
