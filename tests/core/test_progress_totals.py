"""Progress a person can plan by: the bars of the long passes (gradients, JVP embeddings) show done / total and
the time left, because the batches they iterate know their count (``data.batch.Batches``), while staying a plain
iterator for every caller."""

import datasets
import pytest

from idistill_core.data.batch import Batches, batches_for, iter_batches
from idistill_core.data.chat import tokenize_rows
from idistill_core.models.loading import load_model


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama", attn_implementation="eager")
    rows = [
        {"sample_id": f"s{i}", "source": "t", "messages": [{"role": "user", "content": f"{i}+1?"},
                                                          {"role": "assistant", "content": str(i + 1)}]}
        for i in range(10)
    ]
    examples = tokenize_rows(datasets.Dataset.from_list(rows), loaded.tokenizer, 64).examples
    return loaded, examples


def test_batches_of_a_sized_pool_know_their_count_and_stay_an_iterator(tiny):
    loaded, examples = tiny
    batches = batches_for(examples, loaded.tokenizer, 4)
    assert isinstance(batches, Batches) and len(batches) == 3
    first = next(batches)  # still an iterator, as callers use it
    assert len(first.sample_ids) == 4 and sum(len(b.sample_ids) for b in batches) == 6
    assert not hasattr(iter_batches(iter(list(examples)), 4, 0), "__len__")  # unknown length: a plain generator


def test_the_gradient_and_embedding_bars_show_done_of_total(tiny, capsys):
    from idistill_core.steps.embed import EmbedConfig, embed_samples
    from idistill_core.steps.gradients import GradientConfig, iter_gradients

    loaded, examples = tiny
    list(iter_gradients(loaded.model, batches_for(examples, loaded.tokenizer, 4), GradientConfig(proj_dim=32), progress=True))
    config = EmbedConfig(num_blocks=2, num_tangents=2, proj_dim=16, dtype="float32")
    list(embed_samples(loaded.model, batches_for(examples, loaded.tokenizer, 4), config, progress=True))
    err = capsys.readouterr().err
    assert "gradients: 100%" in err and "3/3" in err, err[-500:]
    assert "jvp embeddings: 100%" in err, err[-500:]
