"""Fixtures shared across test folders: the tiny random Llama (eager attention, for JVPs) and the built-in
data (pool of 120, small arith dev set) tokenized for it."""

import pytest

TINY_MAX_LENGTH = 192
TINY_HIDDEN = 32
"""``hidden_size`` of ``tiny_llama``: the width of the final-hidden part of its embeddings."""
"""Long enough that no built-in sample is truncated with the tiny byte-level tokenizer."""


@pytest.fixture(scope="session")
def tiny():
    from idistill_core.models.loading import load_model

    return load_model("tiny-llama", attn_implementation="eager")


@pytest.fixture(scope="session")
def data(tmp_path_factory, tiny):
    """(pool, arith dev) tokenized examples of a 120-sample built-in pool."""
    from idistill_core.data.builtin import write_builtin
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.data.rows import load_rows

    folder = tmp_path_factory.mktemp("builtin")
    write_builtin(folder, pool_size=120, seed=0, dev_size=6, test_size=4)
    pool = tokenize_rows(load_rows(str(folder / "pool.jsonl")), tiny.tokenizer, TINY_MAX_LENGTH).examples
    dev = tokenize_rows(load_rows(str(folder / "targets/arith/dev.jsonl")), tiny.tokenizer, TINY_MAX_LENGTH).examples
    return pool, dev


def tiny_llama(seed: int = 0, fork_rng: bool = False, **overrides):
    """A random 2-layer Llama (vocab 64, hidden 32, MLP 64, 4 heads / 2 kv heads) for exactness tests.

    Built right after ``torch.manual_seed(seed)``; with ``fork_rng`` the caller's global RNG state is restored
    afterwards. ``overrides`` go to ``LlamaConfig`` (layers, attention implementation, init range, tying...).
    """
    import torch
    import transformers

    fields = {
        "vocab_size": 64,
        "hidden_size": TINY_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    config = transformers.LlamaConfig(**{**fields, **overrides})
    if fork_rng:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return transformers.LlamaForCausalLM(config)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)
