"""`auto` precision: capability gates, the measured probe decides, explicit requests win, one probe per key."""

import dataclasses

import pytest
import torch

from idistill_core.errors import ConfigError
from idistill_core.models import precision
from idistill_core.models.precision import PrecisionResolver, finetune_precision


def _fake_probe(monkeypatch, fp32_ms, bf16_ms, gradients=None):
    """``probe_ms`` returning fixed timings (``gradients``: other timings for that workload); records the calls."""
    calls = []

    def probe(device, hidden, intermediate, tokens, repeats, workload="forward"):
        calls.append((str(device), hidden, intermediate) + ((workload,) if workload != "forward" else ()))
        return gradients if workload == "gradients" and gradients is not None else (fp32_ms, bf16_ms)

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


@pytest.mark.parametrize("workload", ["forward", "gradients"])
def test_real_probe_returns_positive_timings(workload):
    fp32_ms, bf16_ms = precision.probe_ms(torch.device("cpu"), 32, 64, tokens=16, repeats=2, workload=workload)
    assert fp32_ms > 0 and bf16_ms > 0


def test_gradient_probe_times_a_backward_under_autocast():
    """The gradients workload is the per-sample gradient pass: autocast bf16 matmuls, float32 weights, a weight
    gradient for down_proj and an input gradient, in both dtypes (a forward-only probe cannot see the casts)."""
    gen = torch.Generator().manual_seed(0)
    x, gate, up, down = (torch.randn(*shape, generator=gen) for shape in ((8, 32), (64, 32), (64, 32), (32, 64)))
    for dtype in (torch.float32, torch.bfloat16):
        gx, gdown = precision._gradient_call(x, gate, up, down, dtype)()
        assert gx.shape == (8, 32) and gdown.shape == (32, 64)
        assert gdown.dtype == torch.float32  # float32 weights keep float32 gradients under autocast
    exact = precision._gradient_call(x.double(), gate.double(), up.double(), down.double(), torch.float32)()[1]
    low = precision._gradient_call(x, gate, up, down, torch.bfloat16)()[1]
    rel = float((low.double() - exact).norm() / exact.norm())
    assert 1e-4 < rel < 0.05  # really computed in bf16 (not float32), and still the same gradient
    with pytest.raises(ConfigError, match="workload must be one of"):
        precision.probe_ms(torch.device("cpu"), 32, 64, workload="training")


def test_gradients_are_decided_by_their_own_probe(native_cpu, monkeypatch):
    # bf16 wins the forward matmuls but loses the batch-1 backward under autocast (as on an AMX Xeon)
    calls = _fake_probe(monkeypatch, 10.0, 3.0, gradients=(10.0, 27.0))
    resolver = PrecisionResolver()
    forward = resolver.resolve("auto", "cpu", (576, 1536))
    grads = resolver.resolve("auto", "cpu", (576, 1536), workload="gradients")
    assert forward.dtype == "bfloat16" and grads.dtype == "float32"
    assert grads.workload == "gradients" and "gradients probe" in grads.summary() and "2.70x" in grads.reason
    assert resolver.resolve("auto", "cpu", (576, 1536), workload="gradients") is grads  # cached per workload
    assert calls == [("cpu", 576, 1536), ("cpu", 576, 1536, "gradients")]


def test_finetune_precision_maps_the_decision():
    bf16 = precision.PrecisionDecision("bfloat16", "auto", "r", "cpu", "c")
    fp32 = dataclasses.replace(bf16, dtype="float32")
    assert finetune_precision("auto", bf16) == "bf16-autocast"
    assert finetune_precision("auto", fp32) == "fp32"
    assert finetune_precision("fp32", bf16) == "fp32"


def test_recipe_resolution_makes_fingerprints_concrete(native_cpu, monkeypatch):
    from idistill_core.pipeline.recipe import SelectionRecipe, resolve_recipe
    from tests.conftest import tiny_llama

    _fake_probe(monkeypatch, 10.0, 3.0, gradients=(10.0, 27.0))
    model = tiny_llama(fork_rng=True, intermediate_size=8192)  # an MLP big enough to be probed
    recipe = SelectionRecipe()
    resolved, lines = resolve_recipe(recipe, model, PrecisionResolver())
    assert recipe.embed.dtype == "auto" and resolved.embed.dtype == "bfloat16"
    # gradients are auto by default too, decided by the gradient probe (here: bf16 slower at batch 1)
    assert recipe.gradients.dtype == "auto" and resolved.gradients.dtype == "float32"
    assert resolved.embed_fingerprint("m" * 8) != recipe.embed_fingerprint("m" * 8)
    assert lines["embeddings"].startswith("bfloat16 (auto:")
    assert lines["gradients"].startswith("float32 (auto:") and "gradients probe" in lines["gradients"]


def test_auto_keeps_float32_for_shapes_too_small_to_time(native_cpu, monkeypatch):
    # A tiny model's probe takes microseconds; noise there must never flip runs between dtypes.
    calls = _fake_probe(monkeypatch, 0.02, 0.001)
    decision = PrecisionResolver().resolve("auto", "cpu", (32, 64))
    assert decision.dtype == "float32" and "too small" in decision.reason
    assert calls == []  # decided from the shapes: no timing, so no run-to-run flip


def test_gradient_passes_ask_for_the_gradient_probe(native_cpu, monkeypatch):
    """`iter_gradients` (and so every landmark and target gradient) resolves `auto` with the gradients workload:
    here the forward probe says bfloat16 and the gradient probe float32, and float32 must win."""
    from idistill_core.data.batch import collate
    from idistill_core.steps.gradients import GradientConfig, iter_gradients
    from tests.conftest import tiny_llama

    calls = _fake_probe(monkeypatch, 10.0, 3.0, gradients=(10.0, 27.0))
    model = tiny_llama(fork_rng=True, intermediate_size=8192)
    batch = collate([{"sample_id": "a", "input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}], pad_token_id=0)
    resolver = PrecisionResolver()
    list(iter_gradients(model, [batch], GradientConfig(proj_dim=16), resolver=resolver))
    hidden = model.config.hidden_size
    assert calls == [("cpu", hidden, 8192, "gradients")]
    assert resolver.resolve("auto", "cpu", (hidden, 8192), workload="gradients").dtype == "float32"
