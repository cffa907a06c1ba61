"""EmbeddingStore: float16 fixed-size vectors round-trip, inserts are idempotent, identities never mix."""

import numpy as np
import pytest

from idistill_core.errors import NumericalError, StoreError
from idistill_core.store import EmbeddingStore, StoreIdentity

IDENTITY = StoreIdentity(model_fingerprint="m1", recipe="r1", dim=6)


def _vectors(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, IDENTITY.dim)).astype(np.float32)


def test_vectors_round_trip_in_requested_order(tmp_path):
    store = EmbeddingStore.open(tmp_path, "emb", IDENTITY)
    ids = [f"s{i}" for i in range(10)]
    vectors = _vectors(10)
    assert store.insert_missing(ids[:6], vectors[:6]) == 6
    assert store.insert_missing(ids[4:], vectors[4:]) == 4  # s4, s5 already there: not duplicated
    assert store.count() == 10
    order = ["s9", "s0", "s5"]
    expected = vectors[[9, 0, 5]].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(store.read(order), expected)
    all_ids, all_vectors = [], []
    for chunk_ids, chunk in store.iter_chunks(chunk_size=3):
        all_ids += chunk_ids
        all_vectors.append(chunk)
    assert sorted(all_ids) == sorted(ids)
    by_id = dict(zip(all_ids, np.concatenate(all_vectors)))
    np.testing.assert_array_equal(by_id["s7"], vectors[7].astype(np.float16).astype(np.float32))


def test_missing_ids_lists_only_unembedded_samples(tmp_path):
    store = EmbeddingStore.open(tmp_path, "emb", IDENTITY)
    store.insert_missing(["a", "b"], _vectors(2))
    assert store.missing_ids(["c", "a", "d", "b"]) == ["c", "d"]


def test_table_of_another_model_or_recipe_is_refused(tmp_path):
    EmbeddingStore.open(tmp_path, "emb", IDENTITY).insert_missing(["a"], _vectors(1))
    other = StoreIdentity(model_fingerprint="m2", recipe="r1", dim=6)
    with pytest.raises(StoreError, match="another model or recipe.*model_fingerprint='m1'"):
        EmbeddingStore.open(tmp_path, "emb", other)
    reopened = EmbeddingStore.open(tmp_path, "emb", IDENTITY)
    assert reopened.count() == 1


def test_non_finite_vectors_are_refused_with_their_sample_id_and_nothing_written(tmp_path):
    store = EmbeddingStore.open(tmp_path, "emb", IDENTITY)
    vectors = _vectors(3)
    vectors[1, 2] = np.nan
    with pytest.raises(NumericalError, match="sample 'b'"):
        store.insert_missing(["a", "b", "c"], vectors)
    assert store.count() == 0
    vectors[1, 2] = 1e6  # finite in float32 but overflows float16
    with pytest.raises(NumericalError, match="overflows float16"):
        store.insert_missing(["a", "b", "c"], vectors)
    assert store.count() == 0


def test_reading_an_unknown_id_names_it(tmp_path):
    store = EmbeddingStore.open(tmp_path, "emb", IDENTITY)
    store.insert_missing(["a"], _vectors(1))
    with pytest.raises(StoreError, match="zzz"):
        store.read(["a", "zzz"])
