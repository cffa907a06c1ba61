"""Baselines: random is stable per id, RDS+ pooling and mid-ppl NLL match hand computations,
padding never changes a score, the mid-ppl band and LESS group max are right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from idistill_core.data.batch import collate
from idistill_core.errors import ConfigError, DataError
from idistill_core.methods import midppl, rds
from idistill_core.methods import random as random_method
from idistill_core.methods.less import less_scores
from tests.conftest import tiny_llama

VOCAB = 64


@pytest.fixture(scope="module")
def model() -> transformers.LlamaForCausalLM:
    return tiny_llama(0, vocab_size=VOCAB, initializer_range=0.2).double().eval()


def _examples(n: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 3 + i % 5
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        out.append({"sample_id": f"s{i:02d}", "input_ids": ids, "labels": ids})
    return out


def test_random_scores_are_per_id_and_seeded():
    ids = [f"id{i}" for i in range(2000)]
    a = random_method.random_scores(ids, seed=1)
    assert a.shape == (2000,) and bool(((a >= 0) & (a < 1)).all())
    np.testing.assert_array_equal(random_method.random_scores(ids[::-1], seed=1), a[::-1])
    assert not np.array_equal(random_method.random_scores(ids, seed=2), a)
    assert abs(a.mean() - 0.5) < 0.03 and abs((a < 0.25).mean() - 0.25) < 0.04


def test_rds_embedding_is_position_weighted_mean_of_final_hidden_states(model):
    ex = _examples(4)
    ids, emb = rds.rds_embeddings(model, [collate(ex, 0)])
    assert ids == [e["sample_id"] for e in ex]
    for row, e in enumerate(ex):
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([e["input_ids"]])).last_hidden_state[0]
        total = sum(j + 1 for j in range(len(hidden)))
        pooled = sum((j + 1) / total * hidden[j] for j in range(len(hidden)))
        expected = (pooled / pooled.norm()).float()
        torch.testing.assert_close(emb[row], expected, rtol=1e-5, atol=1e-6)


def test_rds_scores_are_cosines_and_padding_does_not_change_them(model):
    pool, targets = _examples(7), _examples(3, seed=5)
    ids, scores = rds.rds_scores(
        model, [collate(pool[:4], 0), collate(pool[4:], 0)], [collate(targets, 0)]
    )
    assert ids == [e["sample_id"] for e in pool] and scores.shape == (7, 3)
    singles = np.concatenate(
        [rds.rds_scores(model, [collate([e], 0)], [collate([t], 0) for t in targets])[1] for e in pool]
    )
    np.testing.assert_allclose(scores, singles, atol=1e-6)
    _, same = rds.rds_scores(model, [collate(pool[:1], 0)], [collate(pool[:1], 0)])
    assert same[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_midppl_nll_is_hf_loss_with_all_tokens_and_ignores_padding(model):
    pool = _examples(6)
    ids, nll = midppl.midppl_scores(model, [collate(pool, 0)])
    assert ids == [e["sample_id"] for e in pool]
    for row, e in enumerate(pool):
        x = torch.tensor([e["input_ids"]])
        with torch.no_grad():
            hf = float(model(input_ids=x, labels=x).loss)
        assert nll[row] == pytest.approx(hf, rel=1e-6)
    with pytest.raises(DataError, match="'short'"):
        midppl.midppl_scores(
            model, [collate([{"sample_id": "short", "input_ids": [3], "labels": [3]}], 0)]
        )


def test_midppl_select_takes_the_band_below_the_top_third():
    ids = [f"s{i}" for i in range(9)]
    nll = np.array([9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0])
    sel = midppl.midppl_select(ids, nll, 3)  # skip floor(9 * 0.33) = 2 (nll 9, 8)
    assert sel.sample_ids == ["s4", "s6", "s8"]
    np.testing.assert_array_equal(sel.scores, [7.0, 6.0, 5.0])
    # ties on the band edge resolve by id
    tied = midppl.midppl_select(["b", "a", "c"], np.array([1.0, 1.0, 1.0]), 1, skip_fraction=0.34)
    assert tied.sample_ids == ["b"]
    with pytest.raises(ConfigError, match=r"k must be in \[1, 7\]"):
        midppl.midppl_select(ids, nll, 8)


def test_less_scores_average_within_groups_then_max():
    pool = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    ids, s = less_scores([(["p0", "p1"], pool[:2]), (["p2"], pool[2:])], targets, ["x", "y", "y"])
    assert ids == ["p0", "p1", "p2"]
    # p0: x-mean 1, y-mean 0 -> 1; p1: x 0, y 1 -> 1; p2: x 1/√2, y 1/√2 -> 1/√2
    np.testing.assert_allclose(s, [1.0, 1.0, 2**-0.5])
    _, one_group = less_scores([(["p2"], pool[2:])], targets)
    np.testing.assert_allclose(one_group, [2**-0.5])


def test_rds_from_stored_pool_features_equals_rds_scores_and_its_selection(tiny, data, tmp_path):
    from idistill_core.methods.base import SelectionContext
    from idistill_core.pipeline.embeddings import embed_rds_pool, open_rds_store
    from idistill_core.pipeline.recipe import SelectionRecipe
    from tests.conftest import TINY_MAX_LENGTH

    pool, dev = data
    model, tokenizer = tiny.model, tiny.tokenizer
    store = open_rds_store(tmp_path, tiny.fingerprint, TINY_MAX_LENGTH, model.config.hidden_size)
    report = embed_rds_pool(model, tokenizer, pool, store, batch_size=8)
    assert report.computed == report.inserted == len(pool) and report.padding_fraction < 0.5
    pool_ids = list(pool["sample_id"])
    features = store.read(pool_ids)
    _, targets = rds.rds_embeddings(model, [collate([dev[i]], tokenizer.pad_token_id) for i in range(len(dev))])
    shared = rds.rds_scores_from_features(features, targets)
    # independent: rds_scores one unpadded sample at a time, nothing stored
    direct_ids, direct = rds.rds_scores(
        model, [collate([pool[i]], 0) for i in range(len(pool))], [collate([dev[i]], 0) for i in range(len(dev))]
    )
    assert direct_ids == pool_ids
    np.testing.assert_allclose(shared, direct, atol=2e-6)  # float32 storage: batching noise only

    recipe = SelectionRecipe(method="rds", max_length=TINY_MAX_LENGTH, batch_size=8)
    from_store = rds.select(SelectionContext(model, tokenizer, "", pool, dev, 10, recipe, pool_features=features)).outcome
    computed = rds.select(SelectionContext(model, tokenizer, "", pool, dev, 10, recipe)).outcome
    assert from_store.selected == computed.selected and len(from_store.selected) == 10


def test_a_partly_filled_rds_table_is_completed_with_only_the_missing_ids(tiny, data, tmp_path, monkeypatch):
    from idistill_core.pipeline.embeddings import embed_rds_pool, open_rds_store
    from tests.conftest import TINY_MAX_LENGTH

    pool, _ = data
    model, tokenizer = tiny.model, tiny.tokenizer
    store = open_rds_store(tmp_path / "a", tiny.fingerprint, TINY_MAX_LENGTH, model.config.hidden_size)
    embed_rds_pool(model, tokenizer, pool.select(range(40)), store, batch_size=8, commit_every=16)  # a killed run
    seen = []
    original = rds.rds_embeddings

    def counting(model, batches):
        ids, emb = original(model, batches)
        seen.extend(ids)
        return ids, emb

    monkeypatch.setattr(rds, "rds_embeddings", counting)
    report = embed_rds_pool(model, tokenizer, pool, store, batch_size=8)
    ids = list(pool["sample_id"])
    assert sorted(seen) == sorted(ids[40:]) and report.inserted == len(ids) - 40 and report.already_present == 40
    assert store.count() == len(ids)
    fresh = open_rds_store(tmp_path / "b", tiny.fingerprint, TINY_MAX_LENGTH, model.config.hidden_size)
    embed_rds_pool(model, tokenizer, pool, fresh, batch_size=8)
    np.testing.assert_allclose(store.read(ids), fresh.read(ids), atol=2e-6)
    assert embed_rds_pool(model, tokenizer, pool, store, batch_size=8).computed == 0


def test_a_failed_rds_feature_run_rolls_its_committed_rows_back(tiny, data, tmp_path, monkeypatch):
    from idistill_core.errors import NumericalError
    from idistill_core.pipeline.embeddings import embed_rds_pool, open_rds_store
    from tests.conftest import TINY_MAX_LENGTH

    pool, _ = data
    model, tokenizer = tiny.model, tiny.tokenizer
    store = open_rds_store(tmp_path, tiny.fingerprint, TINY_MAX_LENGTH, model.config.hidden_size)
    embed_rds_pool(model, tokenizer, pool.select(range(8)), store, batch_size=8)  # an earlier, finished run
    before = store.version
    original, calls = rds.rds_embeddings, []

    def failing_on_the_fourth_batch(model, batches):
        calls.append(1)
        if len(calls) == 4:
            raise NumericalError("sample 'x' has a non-finite feature")
        return original(model, batches)

    monkeypatch.setattr(rds, "rds_embeddings", failing_on_the_fourth_batch)
    with pytest.raises(NumericalError, match=r"non-finite feature; the table .* rolled back to version") as error:
        embed_rds_pool(model, tokenizer, pool, store, batch_size=8, commit_every=8)  # commits 3 batches first
    assert f"version {before} (24 rows of this run removed)" in str(error.value)
    assert store.count() == 8 and store.version > before  # a restore is a new version holding the old rows
    assert store.missing_ids(list(pool["sample_id"])[:8]) == []
