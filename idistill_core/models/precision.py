"""Compute precision chosen by the hardware: ``auto`` resolves to bfloat16 only where it is native AND faster.

A profile that hard-codes ``bfloat16`` is right on a CPU with AMX / AVX512-BF16 (bf16 GEMMs ~0.4x the float32
time) and 6x wrong on an AVX2-only CPU where bf16 is emulated. ``auto`` decides per device:

1. capability: CUDA with native bf16 (``torch.cuda.is_bf16_supported(including_emulation=False)``); a CPU whose
   ``/proc/cpuinfo`` flags have ``amx_bf16`` or ``avx512_bf16`` AND whose ATen kernels run at an AVX512 level
   (``torch.backends.cpu.get_cpu_capability()``; ``ATEN_CPU_CAPABILITY=avx2`` lowers it). Anything else: float32.
2. a measured probe (milliseconds; seconds at 7B shapes) of the workload that will run, timed in float32 and bfloat16 (best of a few
   interleaved repeats). bfloat16 is chosen only when it takes at most ``PROBE_MARGIN`` of the float32 time, so
   the decision does not flip with timing noise between processes. Two workloads:

   - ``forward`` (JVP embeddings, evaluation, fine-tuning): the model's own MLP matmuls, ``(T, H) @ (H, I)`` and
     ``(T, I) @ (I, H)``, with both operands already in the dtype.
   - ``gradients`` (per-sample gradients, batch 1): forward and backward of one gated MLP block of the model's
     shapes with float32 weights under bfloat16 autocast (as ``steps.gradients`` runs it) vs plain float32: the
     weight casts autocast pays on every call, the input-gradient GEMMs and the ``down_proj`` weight gradient
     are all in it. At batch 1 the casts can outweigh the faster GEMMs (bf16 autocast gradients measured 2.7x
     SLOWER on an AMX Xeon, 1.9x faster on a Zen 5 EPYC), which the forward probe cannot see.

Explicit ``float32`` / ``bfloat16`` (or ``fp32`` / ``bf16-autocast`` for fine-tuning) are returned as they are.

The cache lives in a :class:`PrecisionResolver` that callers create once and pass around (no module state): one
decision per (device, shapes) per resolver. The decision is a frozen :class:`PrecisionDecision` that logs as one
line and goes into run metadata as-is.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from idistill_core.errors import ConfigError

__all__ = ["PrecisionDecision", "PrecisionResolver", "cpu_bf16_capability", "model_shapes"]

logger = logging.getLogger("idistill")

REQUESTS = ("auto", "float32", "bfloat16")
PROBE_MARGIN = 0.8
"""bfloat16 must take <= this fraction of the float32 probe time. Native machines measure 0.2-0.5x, emulated
ones 5-100x, so 0.8 separates them with room for noise."""
MIN_MLP_SIZE = 1 << 18
"""Below ``hidden * intermediate`` of this many entries (SmolLM2-135M: 885k; the tests' tiny models: 2k) a
GEMM is too small for bf16 to pay, and its microsecond probe is noise that could flip the decision between two
runs on a loaded machine: float32, decided from the shapes alone so it is deterministic."""
PROBE_TOKENS = 128
PROBE_REPEATS = 3
"""Timed calls per dtype after one warm-up call; the best is kept."""
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


WORKLOADS = ("forward", "gradients")


@dataclass(frozen=True)
class PrecisionDecision:
    """What a requested precision resolved to, and why (one per device, model shape and workload)."""

    dtype: str
    """``float32`` or ``bfloat16`` (``float64`` passes through when asked for explicitly)."""
    requested: str
    reason: str
    device: str
    capability: str
    """What the device offers for bf16, e.g. ``cpu AVX512 amx_bf16,avx512_bf16`` or ``cuda sm_90 bf16``."""
    fp32_ms: float | None = None
    bf16_ms: float | None = None
    workload: str = "forward"
    """The probe that decided (``forward`` or ``gradients``); see the module docstring."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    @property
    def autocast(self) -> bool:
        """True when the pass should run under bfloat16 autocast (fp32 weights, bf16 matmuls)."""
        return self.dtype == "bfloat16"

    def summary(self) -> str:
        """One line for logs, metadata and the CLI summary."""
        probe = ""
        if self.fp32_ms is not None and self.bf16_ms is not None:
            probe = f"; {self.workload} probe fp32 {self.fp32_ms:.2f} ms, bf16 {self.bf16_ms:.2f} ms"
        return f"{self.dtype} ({self.requested}: {self.reason}; {self.capability}{probe})"

    def as_metadata(self) -> dict:
        return asdict(self)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_capability() -> tuple[bool, str]:
    """``(native, description)`` for bfloat16 on this CPU as torch will run it."""
    flags = sorted(_cpu_flags() & {"amx_bf16", "avx512_bf16"})
    level = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    native = bool(flags) and level.upper().startswith("AVX512")
    text = f"cpu {level} {','.join(flags) or 'no bf16 flags'}" + (
        f" ONEDNN_MAX_CPU_ISA={onednn}" if onednn else ""
    )
    return native, text


def _cuda_capability(device: torch.device) -> tuple[bool, str]:
    major, minor = torch.cuda.get_device_capability(device)
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    return native, f"cuda sm_{major}{minor} {'bf16' if native else 'no native bf16'}"


def model_shapes(model: torch.nn.Module) -> tuple[int, int]:
    """``(hidden, intermediate)`` of a transformers causal LM (intermediate defaults to 4x hidden)."""
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    if hidden <= 0:
        raise ConfigError(
            f"{type(model).__name__} has no config.hidden_size; pass the probe shapes explicitly"
        )
    intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    return hidden, intermediate


def _time_ms(fn, device: torch.device) -> float:
    """Milliseconds of one call: on a CPU the CPU time of this thread (``probe_ms`` runs the probe on one
    thread), so a loaded machine that deschedules us does not look like a slow kernel (measured here under load
    14: wall 44 ms vs 1.4 ms quiet for the same matmuls; per-thread CPU time also avoids counting OpenMP
    workers spinning between calls); wall time with synchronisation on an accelerator."""
    if device.type == "cpu":
        start = time.thread_time()
        fn()
        return (time.thread_time() - start) * 1e3
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def probe_ms(
    device: torch.device,
    hidden: int,
    intermediate: int,
    tokens: int = PROBE_TOKENS,
    repeats: int = PROBE_REPEATS,
    workload: str = "forward",
) -> tuple[float, float]:
    """Best-of-``repeats`` milliseconds of ``workload`` (see the module docstring) in float32 and in bfloat16 on
    ``device``.

    The two dtypes are timed interleaved (fp32, bf16, fp32, ...), so a burst of load hits both alike.
    """
    if workload not in WORKLOADS:
        raise ConfigError(f"precision probe workload must be one of {', '.join(WORKLOADS)}; got {workload!r}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # the kernel's per-core speed decides the ratio; see _time_ms
    try:
        if workload == "forward":
            up = torch.randn(hidden, intermediate, generator=gen).to(device)
            down = torch.randn(intermediate, hidden, generator=gen).to(device)
            with torch.no_grad():
                pairs = {dtype: _forward_call(x, up, down, dtype) for dtype in (torch.float32, torch.bfloat16)}
        else:
            # nn.Linear layout, (out, in): gate and up (I, H), down (H, I)
            gate, up = (torch.randn(intermediate, hidden, generator=gen).to(device) for _ in range(2))
            down = torch.randn(hidden, intermediate, generator=gen).to(device)
            pairs = {dtype: _gradient_call(x, gate, up, down, dtype) for dtype in (torch.float32, torch.bfloat16)}
        return _probe(device, pairs, repeats)
    finally:
        torch.set_num_threads(threads)


def _forward_call(x, up, down, dtype):
    a, b, c = x.to(dtype), up.to(dtype), down.to(dtype)
    return lambda: (a @ b) @ c


def _gradient_call(x, gate, up, down, dtype):
    """One per-sample gradient pass through a gated MLP block, as ``steps.gradients`` runs it: float32 weights
    in ``nn.Linear`` layout (``gate``, ``up``: ``(I, H)``; ``down``: ``(H, I)``), only ``down_proj`` requires grad,
    the input's gradient flows on (to the layers below), bfloat16 as autocast (``dtype``) or none."""
    import torch.nn.functional as F

    w_down = down.detach().requires_grad_(True)
    h = x.detach().requires_grad_(True)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    autocast = dtype == torch.bfloat16

    def call():
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), w_down)
            loss = (y.float() * probe).sum()
        return torch.autograd.grad(loss, (h, w_down))

    return call


def _probe(device: torch.device, pairs: dict, repeats: int) -> tuple[float, float]:
    for pair in pairs.values():
        pair()  # warm-up: the first call selects / JIT-compiles the kernel (10x a steady call)
    best = {dtype: float("inf") for dtype in pairs}
    for _ in range(repeats):
        for dtype, pair in pairs.items():
            if dtype == torch.bfloat16 and float("inf") > best[dtype] > 5 * best[torch.float32]:
                continue  # emulated bf16 (10-100x slower): one timing already decides
            best[dtype] = min(best[dtype], _time_ms(pair, device))
    return best[torch.float32], best[torch.bfloat16]


@dataclass
class PrecisionResolver:
    """Resolves ``auto`` once per (device, hidden, intermediate) and remembers the decision.

    Create one per process (the CLI command, the Dagster resource) and pass it to every step, so embeddings,
    gradients, fine-tuning and evaluation in one run agree.
    """

    margin: float = PROBE_MARGIN
    tokens: int = PROBE_TOKENS
    repeats: int = PROBE_REPEATS
    _cache: dict = field(default_factory=dict, repr=False)

    def resolve(
        self,
        requested: str,
        device: torch.device | str = "cpu",
        shapes: tuple[int, int] = (576, 1536),
        workload: str = "forward",
    ) -> PrecisionDecision:
        """The dtype for ``requested`` (``auto``, ``float32``, ``bfloat16``; ``float64`` passes through) when
        running ``workload`` (``forward``: embeddings, evaluation, fine-tuning; ``gradients``: per-sample
        gradients under autocast)."""
        device = torch.device(device)
        if requested not in REQUESTS and requested != "float64":
            raise ConfigError(f"precision must be one of {', '.join(REQUESTS)}; got {requested!r}")
        if workload not in WORKLOADS:
            raise ConfigError(f"precision workload must be one of {', '.join(WORKLOADS)}; got {workload!r}")
        key = (str(device), tuple(shapes), workload)
        if requested != "auto":
            return PrecisionDecision(
                requested, requested, "explicit", str(device), self._capability(device)[1], workload=workload
            )
        if key not in self._cache:
            self._cache[key] = self._decide(device, shapes, workload)
            logger.info("precision auto on %s for %s: %s", device, workload, self._cache[key].summary())
        return self._cache[key]

    def resolve_for_model(
        self, requested: str, model: torch.nn.Module, workload: str = "forward"
    ) -> PrecisionDecision:
        """:meth:`resolve` on the device and MLP shapes of ``model``."""
        device = next(model.parameters()).device
        shapes = model_shapes(model) if requested == "auto" else (0, 0)
        return self.resolve(requested, device, shapes, workload)

    @staticmethod
    def _capability(device: torch.device) -> tuple[bool, str]:
        if device.type == "cpu":
            return cpu_bf16_capability()
        if device.type == "cuda":
            return _cuda_capability(device)
        return False, f"{device.type} (bf16 not probed)"

    def _decide(self, device: torch.device, shapes: tuple[int, int], workload: str) -> PrecisionDecision:
        native, capability = self._capability(device)
        if not native:
            return PrecisionDecision("float32", "auto", "no native bfloat16", str(device), capability, workload=workload)
        if shapes[0] * shapes[1] < MIN_MLP_SIZE:
            reason = f"model too small for bfloat16 to pay (MLP {shapes[0]}x{shapes[1]})"
            return PrecisionDecision("float32", "auto", reason, str(device), capability, workload=workload)
        fp32, bf16 = probe_ms(device, *shapes, tokens=self.tokens, repeats=self.repeats, workload=workload)
        fp32, bf16 = round(fp32, 3), round(bf16, 3)
        if bf16 <= self.margin * fp32:
            reason = f"native bfloat16, measured {bf16 / fp32:.2f}x the float32 time"
            return PrecisionDecision("bfloat16", "auto", reason, str(device), capability, fp32, bf16, workload)
        reason = f"native bfloat16 but measured {bf16 / fp32:.2f}x the float32 time (needs <= {self.margin})"
        return PrecisionDecision("float32", "auto", reason, str(device), capability, fp32, bf16, workload)


def finetune_precision(requested: str, decision: PrecisionDecision | None) -> str:
    """``FinetuneConfig.precision`` (``auto``, ``bf16-autocast``, ``fp32``) as a concrete value."""
    if requested != "auto":
        return requested
    if decision is None:
        raise ConfigError("finetune precision 'auto' needs a resolved PrecisionDecision")
    return "bf16-autocast" if decision.dtype == "bfloat16" else "fp32"
