"""Fixtures shared by the core tests of one method across files."""

import pytest
import torch

from idistill_core.data.batch import iter_batches
from idistill_core.methods.less import LessConfig, lora_warmup
from idistill_core.models import precision

LESS_CFG = LessConfig(warmup_fraction=0.1, epochs=2, lora_rank=2, lr=1e-3, batch_size=3, proj_dim=64, seed=3)
"""Two epochs (two checkpoints) of a rank-2 LoRA warm-up on 6 pool rows: the LESS tests' one warm-up."""


def less_rows(examples, tokenizer, n):
    """The first ``n`` rows as one-row batches, padded with the tokenizer's pad (or eos) token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return list(iter_batches(examples.select(range(n)), 1, int(pad)))


@pytest.fixture(scope="module")
def warm(tiny, data):
    """``LESS_CFG``'s LoRA warm-up of the tiny model on the first 6 pool rows (one per test module)."""
    pool, _ = data
    return lora_warmup(tiny.model, less_rows(pool, tiny.tokenizer, 6), LESS_CFG)


@pytest.fixture
def native_cpu(monkeypatch):
    """A CPU with native bfloat16 (``amx_bf16``, ``avx512_bf16``, ATen at AVX512) and no oneDNN cap, whatever this
    machine is: the precision tests' capability text is ``cpu AVX512 amx_bf16,avx512_bf16``."""
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"fpu", "sse2", "amx_bf16", "avx512_bf16"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
