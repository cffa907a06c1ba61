"""Length-bucketed batching: less padding, the same per-id results as unsorted batching, ids on the right rows."""

import dataclasses

import numpy as np
import pytest
import torch

from idistill_core.data.batch import batch_padding, batches_for, length_order, padding_fraction
from idistill_core.methods import midppl
from idistill_core.methods.base import SelectionContext
from idistill_core.pipeline.gradients import compute_gradients
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.steps.embed import EmbedConfig, embed_samples
from idistill_core.steps.gradients import GradientConfig

# float32 results of one sample differ between batch compositions by round-off only (other GEMM shapes,
# softmax rows of another length): 100 float32 eps of the output's scale, as in test_embed's batched check.
F32_TOL = 100 * torch.finfo(torch.float32).eps


def test_length_order_is_a_stable_sort_and_padding_fraction_counts_wasted_positions():
    lengths = [5, 1, 5, 3, 1]
    assert length_order(lengths) == [1, 4, 3, 0, 2]  # ties keep input order
    # batches of 2: [5,1] -> 10 slots, 6 real; [5,3] -> 10, 8; [1] -> 1, 1  => 1 - 15/21
    assert padding_fraction(lengths, 2) == pytest.approx(1 - 15 / 21)
    assert padding_fraction([lengths[i] for i in length_order(lengths)], 2) == pytest.approx(1 - 15 / 17)
    assert padding_fraction([], 4) == 0.0


def test_missing_suffix_sorts_into_the_batches_of_the_uninterrupted_pass():
    # A killed pass commits whole batches of the sorted order; the rest, sorted again, must form exactly
    # the remaining batches (so a resumed pass computes the same numbers as an uninterrupted one).
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=50).tolist()
    order = length_order(lengths)
    committed = set(order[:16])  # two batches of 8
    remaining = [i for i in range(50) if i not in committed]  # in pool order, as store.missing_ids gives
    resorted = [remaining[j] for j in length_order([lengths[i] for i in remaining])]
    assert resorted == order[16:]


def test_bucketed_batches_cut_padding_and_keep_ids_on_their_rows(tiny, data):
    pool, _ = data
    plain = list(batches_for(pool, tiny.tokenizer, 8, bucket=False))
    bucketed = list(batches_for(pool, tiny.tokenizer, 8))
    assert sorted(s for b in bucketed for s in b.sample_ids) == sorted(pool["sample_id"])
    row = {s: i for i, s in enumerate(pool["sample_id"])}
    for batch in bucketed:
        for b, sample_id in enumerate(batch.sample_ids):
            n = int(batch.attention_mask[b].sum())
            assert batch.input_ids[b, :n].tolist() == pool[row[sample_id]]["input_ids"]
            assert batch.labels[b, :n].tolist() == pool[row[sample_id]]["labels"]

    def measured(batches):
        real = sum(int(b.attention_mask.sum()) for b in batches)
        return 1 - real / sum(b.input_ids.numel() for b in batches)

    assert batch_padding(pool, 8) == pytest.approx(measured(bucketed))
    assert batch_padding(pool, 8, bucket=False) == pytest.approx(measured(plain))
    assert measured(bucketed) < 0.5 * measured(plain)


def test_bucketed_embeddings_equal_unsorted_batching_per_sample_id(tiny, data):
    pool, _ = data
    ids = list(pool["sample_id"])[:24]
    config = EmbedConfig(num_blocks=2, proj_dim=64, dtype="float32", batch_size=8)

    def run(bucket):
        out = {}
        for sample_ids, emb in embed_samples(
            tiny.model, batches_for(pool, tiny.tokenizer, 8, ids, bucket), config
        ):
            out.update(zip(sample_ids, emb))
        return out

    bucketed, plain = run(True), run(False)
    assert set(bucketed) == set(plain) == set(ids)
    got = np.stack([bucketed[s] for s in ids])
    ref = np.stack([plain[s] for s in ids])
    np.testing.assert_allclose(got, ref, rtol=0, atol=F32_TOL * np.abs(ref).max())
    assert np.abs(ref[0] - ref[1]).max() > 1e-3 * np.abs(ref).max()  # distinct rows: a row mix-up would show


def test_bucketed_gradients_come_back_in_the_order_asked(tiny, data):
    pool, _ = data
    ids = list(pool["sample_id"])[5:17][::-1]
    config = GradientConfig(proj_dim=128, batch_size=4, dtype="float32")  # vmap path: batches are padded
    got = compute_gradients(tiny.model, tiny.tokenizer, pool, ids, config)
    ref = compute_gradients(tiny.model, tiny.tokenizer, pool, ids, dataclasses.replace(config, batch_size=1))
    assert got.sample_ids == ref.sample_ids == ids
    torch.testing.assert_close(got.grads, ref.grads, rtol=0, atol=F32_TOL)  # unit-norm rows


def test_bucketed_forward_baseline_scores_are_in_pool_order(tiny, data):
    pool, dev = data
    pool = pool.select(range(32))
    recipe = SelectionRecipe(method="midppl", batch_size=8)
    bucketed = midppl.select(SelectionContext(tiny.model, tiny.tokenizer, "", pool, dev, 10, recipe)).outcome
    one = midppl.select(
        SelectionContext(tiny.model, tiny.tokenizer, "", pool, dev, 10, dataclasses.replace(recipe, batch_size=1))
    ).outcome
    assert bucketed.sample_ids == one.sample_ids == list(pool["sample_id"])
    np.testing.assert_allclose(bucketed.scores, one.scores, rtol=F32_TOL * 10, atol=0)
    assert bucketed.selected == one.selected
