"""EmbeddingStore: float16 fixed-size vectors round-trip, inserts are idempotent, identities never mix."""

import numpy as np
import pytest

from idistill_core.errors import NumericalError, StoreError
from idistill_core.store.lance import EmbeddingStore, StoreIdentity

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


def test_key_is_declared_in_lance_and_indexed_once_rows_exist(tmp_path):
    store = EmbeddingStore.open(tmp_path, "emb", IDENTITY)
    assert store.primary_key == "sample_id"  # LanceDB's own key: merge_insert matches on it
    assert not store.has_key_index()  # nothing to index yet
    store.insert_missing([f"s{i}" for i in range(50)], _vectors(50))
    assert store.has_key_index()
    store.insert_missing([f"s{i}" for i in range(50, 80)], _vectors(30, seed=1), optimize_after_rows=10)
    stats = store._table.index_stats("sample_id_idx")
    assert stats.num_indexed_rows == 80 and stats.num_unindexed_rows == 0  # optimize folded the append in


def test_reads_of_a_set_of_ids_come_back_in_the_requested_order(tmp_path):
    store = EmbeddingStore.open(tmp_path, "emb", IDENTITY)
    n = 3000
    ids = [f"id-{i:05d}" for i in range(n)]
    vectors = _vectors(n)
    store.insert_missing(ids, vectors, commit_mb=0.05)  # several commits
    order = np.random.default_rng(3).permutation(n)[:700]
    expected = vectors[order].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(store.read([ids[i] for i in order]), expected)
    chunks = list(store.iter_chunks(chunk_size=256, sample_ids=[ids[i] for i in order]))
    assert [s for chunk_ids, _ in chunks for s in chunk_ids] == [ids[i] for i in order]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), expected)


def test_commits_are_sized_in_megabytes(tmp_path):
    store = EmbeddingStore.open(tmp_path, "emb", StoreIdentity("m", "r", 256))
    per_commit = store.rows_per_commit(0.1)
    assert per_commit == int(0.1 * 2**20 // (2 * 256 + 64))
    before = store.version
    n = 3 * per_commit + 5
    store.insert_missing([f"s{i}" for i in range(n)], np.ones((n, 256), np.float32), commit_mb=0.1)
    merges = store.version - before - 1  # the index build is one more commit
    assert merges == 4 and store.count() == n


def test_missing_ids_keep_the_requested_order_over_many_rows(tmp_path):
    store = EmbeddingStore.open(tmp_path, "emb", IDENTITY)
    store.insert_missing([f"s{i}" for i in range(0, 2000, 2)], _vectors(1000))
    asked = [f"s{i}" for i in range(1999, -1, -1)]
    assert store.missing_ids(asked) == [f"s{i}" for i in range(1999, -1, -2)]


def test_a_view_pinned_at_a_version_does_not_see_later_appends(tmp_path):
    store = EmbeddingStore.open(tmp_path, "emb", IDENTITY)
    store.insert_missing(["a", "b"], _vectors(2))
    version = store.version
    store.insert_missing(["c"], _vectors(1, seed=5))
    pinned = EmbeddingStore.open(tmp_path, "emb", IDENTITY, version=version)
    assert pinned.count() == 2 and pinned.sample_ids() == ["a", "b"] and pinned.version == version
    np.testing.assert_array_equal(pinned.read(["b"]), store.read(["b"]))
    with pytest.raises(StoreError, match="'c'"):
        pinned.read(["c"])
    with pytest.raises(StoreError, match="pinned at version"):
        pinned.insert_missing(["d"], _vectors(1))
    with pytest.raises(StoreError, match="no version 999"):
        store.at_version(999)


def test_a_create_that_lost_the_race_opens_the_winners_table_with_its_rows(tmp_path):
    # The one interleaving the old file lock guarded: process B saw no table, then A created it and committed
    # rows before B's create ran. Replayed deterministically by hiding the table from B's listing.
    winner = EmbeddingStore.open(tmp_path, "emb", IDENTITY)
    winner.insert_missing(["a", "b", "c"], _vectors(3))
    from idistill_core.store import lance as store_module

    class StaleListing:
        def __init__(self, db):
            self._db = db

        def list_tables(self):
            return type("Tables", (), {"tables": []})()

        def __getattr__(self, name):
            return getattr(self._db, name)

    table = EmbeddingStore._open_or_create(StaleListing(store_module._connect(tmp_path)), tmp_path, "emb", IDENTITY)
    loser = EmbeddingStore(table, IDENTITY, str(tmp_path), "emb")
    assert loser.count() == 3
    assert loser.insert_missing(["c", "d"], _vectors(2, seed=9)) == 1
    assert sorted(winner.sample_ids()) == ["a", "b", "c", "d"]


# --- the table a pass leaves: compacted and fully indexed --------------------------------------------------------


def _commits(store, n_commits, rows, offset=0):
    for c in range(n_commits):
        first = offset + c * rows
        store.insert_missing([f"s{i:05d}" for i in range(first, first + rows)], _vectors(rows, seed=first))


def test_optimize_compacts_the_commits_and_indexes_every_row(tmp_path):
    store = EmbeddingStore.open(tmp_path, "emb", IDENTITY)
    _commits(store, 12, 10)  # as a pass that commits every few rows leaves it
    assert store.layout() == {"rows": 120, "fragments": 12, "unindexed_rows": 110}  # index over the first commit
    before = store.read(["s00119", "s00000", "s00055"])
    report = store.optimize()
    assert report["before"]["fragments"] == 12 and report["after"] == {"rows": 120, "fragments": 1, "unindexed_rows": 0}
    np.testing.assert_array_equal(store.read(["s00119", "s00000", "s00055"]), before)


def test_optimize_after_a_small_append_rewrites_only_fragments_below_the_target(tmp_path):
    store = EmbeddingStore.open(tmp_path, "emb", IDENTITY)
    _commits(store, 6, 50)
    store.optimize(fragment_rows=100)
    full = {f.fragment_id for f in store._table.to_lance().get_fragments()}
    assert store.layout()["fragments"] == 3  # 300 rows in fragments of 100
    _commits(store, 2, 5, offset=300)
    report = store.optimize(fragment_rows=100)
    kept = {f.fragment_id for f in store._table.to_lance().get_fragments()}
    assert full <= kept  # the full fragments were not rewritten
    assert report["after"] == {"rows": 310, "fragments": 4, "unindexed_rows": 0}  # the two appends became one


def test_an_embedding_pass_leaves_the_store_optimised_whatever_its_commit_size(tmp_path):
    """The pipeline's writer (`_fill_store`, behind `embed_pool` for both the local and the Ray backend): a pass
    that commits every 8 rows ends compacted with the whole table in the key index; one that inserts nothing does
    not touch it."""
    from idistill_core.pipeline.embeddings import _fill_store

    store = EmbeddingStore.open(tmp_path, "emb", IDENTITY)
    ids = [f"s{i:03d}" for i in range(40)]
    vectors = _vectors(40)
    stream = ((ids[i : i + 4], vectors[i : i + 4]) for i in range(0, 40, 4))
    report = _fill_store(store, stream, 40, 40, 0.0, 0.0, 8, None, "embeddings")
    assert report.inserted == 40 and report.optimize["before"]["fragments"] == 5
    assert store.layout() == {"rows": 40, "fragments": 1, "unindexed_rows": 0}
    assert report.table_version == store.version  # what downstream pins is the optimised version
    np.testing.assert_array_equal(store.read(ids[::-1]), vectors[::-1].astype(np.float16).astype(np.float32))
    again = _fill_store(store, iter(()), 40, 0, 0.0, 0.0, 8, None, "embeddings")
    assert again.optimize is None and store.version == report.table_version
