"""Fixtures shared across test folders: the tiny random Llama (eager attention, for JVPs) and the built-in
data (pool of 120, small arith dev set) tokenized for it."""

import pytest

TINY_MAX_LENGTH = 192
"""Long enough that no built-in sample is truncated with the tiny byte-level tokenizer."""


@pytest.fixture(scope="session")
def tiny():
    from idistill_core.models import load_model

    return load_model("tiny-llama", attn_implementation="eager")


@pytest.fixture(scope="session")
def data(tmp_path_factory, tiny):
    """(pool, arith dev) tokenized examples of a 120-sample built-in pool."""
    from idistill_core.builtin import write_builtin
    from idistill_core.data import load_rows, tokenize_rows

    folder = tmp_path_factory.mktemp("builtin")
    write_builtin(folder, pool_size=120, seed=0, dev_size=6, test_size=4)
    pool = tokenize_rows(load_rows(str(folder / "pool.jsonl")), tiny.tokenizer, TINY_MAX_LENGTH).examples
    dev = tokenize_rows(load_rows(str(folder / "targets/arith/dev.jsonl")), tiny.tokenizer, TINY_MAX_LENGTH).examples
    return pool, dev
