"""The mutmut survivors of ``models/precision.py`` outside the probe's timer (issue 25, docs/mutation-testing.md).

What a decision records: every field of the decision in each of ``_decide``'s four branches, the probe's rounded
timings and the 0.8 margin's edge, the one-line summary and the metadata round trip; how the CPU is read:
``/proc/cpuinfo``'s flags line (x86) or Features line (ARM) and the capability text with ``ONEDNN_MAX_CPU_ISA``;
the model's MLP shapes from its config; which device gets which capability check, and the cache per device.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from idistill_core.errors import ConfigError
from idistill_core.models import precision
from idistill_core.models.precision import PrecisionDecision, PrecisionResolver

NATIVE_TEXT = "cpu AVX512 amx_bf16,avx512_bf16"


def _probe_returning(monkeypatch, fp32_ms: float, bf16_ms: float) -> list[tuple]:
    """``probe_ms`` returning fixed timings; records ``(device, shapes, tokens, repeats, workload)`` per call."""
    calls = []

    def probe(device, hidden, intermediate, tokens, repeats, workload="forward"):
        calls.append((device, (hidden, intermediate), tokens, repeats, workload))
        return fp32_ms, bf16_ms

    monkeypatch.setattr(precision, "probe_ms", probe)
    return calls


def test_summary_adds_the_probe_only_when_both_timings_exist():
    explicit = PrecisionDecision("float32", "float32", "explicit", "cpu", "cpu AVX2 no bf16 flags")
    assert explicit.summary() == "float32 (float32: explicit; cpu AVX2 no bf16 flags)"
    assert dataclasses.replace(explicit, fp32_ms=1.0).summary() == explicit.summary()
    timed = dataclasses.replace(explicit, fp32_ms=2.0, bf16_ms=0.5, workload="gradients")
    assert timed.summary() == (
        "float32 (float32: explicit; cpu AVX2 no bf16 flags; gradients probe fp32 2.00 ms, bf16 0.50 ms)"
    )


def test_metadata_holds_every_field_and_rebuilds_the_decision():
    decision = PrecisionDecision("bfloat16", "auto", "r", "cpu", "c", 2.0, 0.5, "gradients")
    metadata = decision.as_metadata()
    assert metadata == {
        "dtype": "bfloat16", "requested": "auto", "reason": "r", "device": "cpu", "capability": "c",
        "fp32_ms": 2.0, "bf16_ms": 0.5, "workload": "gradients",
    }
    assert PrecisionDecision(**metadata) == decision


X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx512_bf16\nbugs\t\t: sysret_ss_attrs\n\n" \
      "processor\t: 1\nflags\t\t: other cpu\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16 sve\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize(
    "text, flags",
    [(X86, {"fpu", "sse2", "avx512_bf16"}), (ARM, {"fp", "asimd", "bf16", "sve"}), ("processor\t: 0\n", set())],
    ids=["x86-flags", "arm-features", "no-flags-line"],
)
def test_cpu_flags_are_the_first_flags_or_features_line_of_proc_cpuinfo(tmp_path, monkeypatch, text, flags):
    (tmp_path / "cpuinfo").write_text(text)
    real = Path
    monkeypatch.setattr(precision, "Path", lambda p: real(tmp_path / "cpuinfo") if p == "/proc/cpuinfo" else real(p))
    assert precision._cpu_flags() == flags


def test_cpu_flags_are_empty_when_proc_cpuinfo_cannot_be_read(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "Path", lambda p: tmp_path / "absent")  # macOS, Windows, a sandbox
    assert precision._cpu_flags() == set()


def test_capability_text_names_the_aten_level_the_bf16_flags_and_a_onednn_cap(native_cpu, monkeypatch):
    assert precision.cpu_bf16_capability() == (True, NATIVE_TEXT)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert precision.cpu_bf16_capability() == (True, NATIVE_TEXT + " ONEDNN_MAX_CPU_ISA=AVX2")
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"fpu", "avx2"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert precision.cpu_bf16_capability() == (False, "cpu AVX2 no bf16 flags ONEDNN_MAX_CPU_ISA=AVX2")


def _model(**config):
    return SimpleNamespace(config=SimpleNamespace(**config))


@pytest.mark.parametrize(
    "model, shapes",
    [
        (_model(hidden_size=3, intermediate_size=7), (3, 7)),
        (_model(hidden_size=3), (3, 12)),  # a config without intermediate_size: 4 × hidden
        (_model(hidden_size=3, intermediate_size=None), (3, 12)),
        (_model(hidden_size=1, intermediate_size=0), (1, 4)),
    ],
)
def test_model_shapes_read_hidden_and_intermediate_from_the_config(model, shapes):
    assert precision.model_shapes(model) == shapes


@pytest.mark.parametrize(
    "model",
    [torch.nn.Linear(2, 2), _model(), _model(hidden_size=0), _model(hidden_size=None, intermediate_size=8)],
    ids=["no-config", "no-hidden_size", "hidden-0", "hidden-None"],
)
def test_a_model_without_a_positive_hidden_size_is_a_config_error(model):
    with pytest.raises(ConfigError, match="no config.hidden_size"):
        precision.model_shapes(model)


def test_an_explicit_precision_needs_no_model_shapes():
    """Only ``auto`` probes; a model with no transformers config (a bare module) may still ask for float32."""
    decision = PrecisionResolver().resolve_for_model("float32", torch.nn.Linear(2, 2), workload="gradients")
    assert (decision.dtype, decision.reason, decision.workload) == ("float32", "explicit", "gradients")


def test_no_native_bfloat16_records_the_whole_decision(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"fpu"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    decision = PrecisionResolver().resolve("auto", "cpu", (576, 1536), workload="gradients")
    assert decision == PrecisionDecision(
        "float32", "auto", "no native bfloat16", "cpu", "cpu AVX2 no bf16 flags", workload="gradients"
    )


def test_too_small_is_decided_on_hidden_times_intermediate_and_records_the_whole_decision(native_cpu, monkeypatch):
    calls = _probe_returning(monkeypatch, 10.0, 1.0)
    small = PrecisionResolver().resolve("auto", "cpu", (1, 1 << 17), workload="gradients")
    reason = "model too small for bfloat16 to pay (MLP 1x131072)"
    assert small == PrecisionDecision("float32", "auto", reason, "cpu", NATIVE_TEXT, workload="gradients")
    assert calls == []
    PrecisionResolver().resolve("auto", "cpu", (1, 1 << 18))  # exactly MIN_MLP_SIZE entries: probed
    assert [shapes for _, shapes, *_ in calls] == [(1, 1 << 18)]


def test_probe_gets_the_resolvers_tokens_and_repeats_and_its_timings_are_kept_to_the_microsecond(
    native_cpu, monkeypatch
):
    calls = _probe_returning(monkeypatch, 1.23456, 0.61234)
    decision = PrecisionResolver(tokens=7, repeats=2).resolve("auto", "cpu", (576, 1536), workload="gradients")
    assert calls == [(torch.device("cpu"), (576, 1536), 7, 2, "gradients")]
    reason = "native bfloat16, measured 0.50x the float32 time"  # 0.612 / 1.235, from the rounded timings
    assert decision == PrecisionDecision("bfloat16", "auto", reason, "cpu", NATIVE_TEXT, 1.235, 0.612, "gradients")


def test_bfloat16_wins_at_exactly_the_margin_and_loses_just_above_it(native_cpu, monkeypatch):
    _probe_returning(monkeypatch, 10.0, 8.0)  # 8.0 == 0.8 × 10.0 exactly in binary floating point
    at_margin = PrecisionResolver().resolve("auto", "cpu", (576, 1536))
    assert at_margin.dtype == "bfloat16"
    _probe_returning(monkeypatch, 10.0, 8.001)
    above = PrecisionResolver().resolve("auto", "cpu", (576, 1536), workload="gradients")
    reason = "native bfloat16 but measured 0.80x the float32 time (needs <= 0.8)"
    assert above == PrecisionDecision("float32", "auto", reason, "cpu", NATIVE_TEXT, 10.0, 8.001, "gradients")


def test_explicit_requests_record_the_whole_decision_and_float64_passes_through(native_cpu):
    resolver = PrecisionResolver()
    decision = resolver.resolve("bfloat16", "cpu", workload="gradients")
    assert decision == PrecisionDecision("bfloat16", "bfloat16", "explicit", "cpu", NATIVE_TEXT, workload="gradients")
    exact = resolver.resolve("float64")  # the exact-influence reference runs in float64
    assert (exact.dtype, exact.torch_dtype, exact.autocast) == ("float64", torch.float64, False)


def test_a_device_without_a_bf16_check_stays_float32_and_is_cached_apart_from_the_cpu(native_cpu, monkeypatch):
    """``meta`` (or ``mps``, ``xpu``): no capability check exists, so never bfloat16 under ``auto``; the resolver's
    cache is per device, so the CPU's probed bfloat16 is not reused for it."""
    calls = _probe_returning(monkeypatch, 10.0, 3.0)
    resolver = PrecisionResolver()
    assert resolver.resolve("auto", "cpu", (576, 1536)).dtype == "bfloat16"
    other = resolver.resolve("auto", "meta", (576, 1536))
    assert other == PrecisionDecision("float32", "auto", "no native bfloat16", "meta", "meta (bf16 not probed)")
    assert len(calls) == 1


@pytest.mark.parametrize("native", [True, False])
def test_a_cuda_device_is_judged_by_native_bf16_and_its_compute_capability_not_the_cpu_flags(native, monkeypatch):
    """No GPU needed: ``torch.device("cuda")`` is only a name until a tensor goes there, and the two CUDA queries are
    replaced. Emulated bf16 (``including_emulation=True``, true on every CUDA device) must not count as native."""
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"amx_bf16", "avx512_bf16"})  # the host CPU would say yes
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or (8, 6))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
    calls = _probe_returning(monkeypatch, 10.0, 3.0)
    decision = PrecisionResolver().resolve("auto", "cuda:1", (576, 1536))
    assert asked == [torch.device("cuda:1")]
    if native:
        assert (decision.dtype, decision.capability, decision.device) == ("bfloat16", "cuda sm_86 bf16", "cuda:1")
        assert [device for device, *_ in calls] == [torch.device("cuda:1")]
    else:
        assert decision == PrecisionDecision(
            "float32", "auto", "no native bfloat16", "cuda:1", "cuda sm_86 no native bf16"
        )
        assert calls == []
