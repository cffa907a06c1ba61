"""Issue 14 — atomic outcomes: a run that fails after committing something leaves the store and the shard
folder as it found them, and says so. The model here has a NaN in the embedding row of one token ('~') that
only a LATER pool sample contains, so earlier chunks are committed before the failure (the case the old NaN test,
which poisoned every sample, never reached)."""

import json
import re

import numpy as np
import pytest

from idistill_core.errors import NumericalError

from .cli import assert_one_line, micro_data, select_argv, table

POISON = "~"  # one byte-level token absent from the built-in pool


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """(data with a poisoned LAST pool sample, path of the saved tiny Llama with a NaN '~' embedding)."""
    import torch

    from idistill_core.models.loading import load_model

    folder = tmp_path_factory.mktemp("poisoned")
    data = micro_data(folder / "data")
    rows = [json.loads(line) for line in data["pool"].read_text().splitlines()]
    assert not any(POISON in json.dumps(r) for r in rows)
    tiny = load_model("tiny-llama")
    # the poisoned sample is the longest, so length bucketing embeds it last: earlier chunks are committed first
    longest = max(len(tiny.tokenizer(m["content"])["input_ids"]) for r in rows for m in r["messages"])
    poison = {**rows[0], "sample_id": "zz-poison"}
    poison["messages"] = [
        {"role": "user", "content": f"say {POISON} " + " ".join(["more"] * (longest + 4))},
        {"role": "assistant", "content": "ok"},
    ]
    data["pool"].write_text("".join(json.dumps(r) + "\n" for r in rows + [poison]))
    (token,) = tiny.tokenizer(POISON, add_special_tokens=False)["input_ids"]
    # untie the output head first: a NaN in a tied row would poison every sample's logits
    tiny.model.config.tie_word_embeddings = False
    tiny.model.lm_head.weight = torch.nn.Parameter(tiny.model.get_input_embeddings().weight.detach().clone())
    with torch.no_grad():
        tiny.model.get_input_embeddings().weight[token] = float("nan")
    tiny.model.save_pretrained(folder / "model")
    tiny.tokenizer.save_pretrained(folder / "model")
    return data, folder / "model"


def test_nan_in_a_later_sample_rolls_the_store_back_and_says_so(poisoned, tmp_path, capsys):
    import lancedb

    from idistill_core.cli import main

    data, model = poisoned
    store, out = tmp_path / "store", tmp_path / "sel.parquet"
    code = main(select_argv(data, out, store, model=model))
    line = assert_one_line(capsys.readouterr().err, "idistill: error: NumericalError: ")
    assert code == 2
    rolled = re.search(r"rolled back to version 1 \((\d+) rows of this run removed\)", line)
    assert "'zz-poison'" in line and rolled and int(rolled.group(1)) > 0, line
    assert table(store) == {} and not out.exists()
    versions = lancedb.connect(str(store)).open_table("embeddings").list_versions()
    assert len(versions) >= 6  # create, 4 committed chunks (and maybe an index), the restore: chunks were committed


def test_failed_resumable_gradients_remove_only_their_own_shards(poisoned, tmp_path):
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.data.rows import load_rows
    from idistill_core.models.loading import load_model
    from idistill_core.pipeline.gradients import compute_gradients_resumable
    from idistill_core.steps.gradients import GradientConfig
    from idistill_core.store import artifacts

    data, model = poisoned
    loaded = load_model(str(model))
    examples = tokenize_rows(load_rows(str(data["pool"])), loaded.tokenizer, 192).examples
    ids = list(examples["sample_id"])  # the poisoned sample is last: chunks 0-3 succeed, chunk 4 fails
    config = GradientConfig(param_subset="down_proj", proj_dim=64, batch_size=4)
    shard_dir = tmp_path / "shards"
    earlier = shard_dir / "chunk-00009.safetensors"  # a shard of an earlier (killed) run: kept
    artifacts.save_arrays(earlier, {"grads": np.zeros((1, 1), np.float32)}, {"ids": ["x"]})
    with pytest.raises(NumericalError, match=r"'zz-poison'.*the 4 gradient shards of this run were removed"):
        compute_gradients_resumable(
            loaded.model, loaded.tokenizer, examples, ids, config, shard_dir, chunk_size=4
        )
    assert sorted(p.name for p in shard_dir.iterdir()) == [earlier.name]
