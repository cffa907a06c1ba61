"""Kernel ridge propagation: interpolation, streaming, a dense reference solve, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from idistill_core.errors import ConfigError, DataError
from idistill_core.steps.propagate import KernelRidge, PropagateConfig, median_bandwidth


def _data(n_land=40, n_pool=300, d=6, t=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_land, d)), rng.normal(size=(n_pool, d)), rng.normal(size=(n_land, t))


def _dense_reference(land, pool, values, kernel, ridge, sigma=None):
    """Textbook KRR in numpy: K_E (K + ridge·mean(diag K) I)^-1 values, via np.linalg.solve."""

    def k(a, b):
        if kernel == "linear":
            return a @ b.T
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * sigma**2))

    kll = k(land, land)
    kll = kll + ridge * np.mean(np.diag(kll)) * np.eye(len(land))
    return k(pool, land) @ np.linalg.solve(kll, values)


def test_all_samples_as_landmarks_with_tiny_ridge_reproduce_their_values():
    land, _, values = _data(n_land=25)
    krr = KernelRidge.fit(land, PropagateConfig(ridge=1e-10))
    torch.testing.assert_close(krr.predict(values, [land]), torch.from_numpy(values), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_prediction_equals_dense_numpy_solve(kernel):
    land, pool, values = _data()
    cfg = PropagateConfig(kernel=kernel, ridge=1e-2)
    krr = KernelRidge.fit(land, cfg)
    sigma = None
    if kernel == "rbf":
        d2 = ((land[:, None] - land[None]) ** 2).sum(-1)
        pairs = np.sort(d2[np.triu_indices(len(land), 1)])
        sigma = float(np.sqrt(pairs[(len(pairs) - 1) // 2]))  # lower median, as torch.median
        assert krr.sigma == pytest.approx(sigma)
    expected = _dense_reference(land, pool, values, kernel, 1e-2, sigma)
    np.testing.assert_allclose(krr.predict(values, [pool]).numpy(), expected, rtol=1e-8, atol=1e-10)
    # Coefficients are the same linear map applied to the values.
    coef = krr.coefficients(pool)
    np.testing.assert_allclose((coef @ torch.from_numpy(values)).numpy(), expected, rtol=1e-8, atol=1e-10)


def test_chunked_prediction_equals_unchunked():
    land, pool, values = _data()
    whole = KernelRidge.fit(land, PropagateConfig()).predict(values, [pool])
    small = KernelRidge.fit(land, PropagateConfig(chunk_size=7))
    ragged = [pool[:13], pool[13:14], pool[14:200], torch.from_numpy(pool[200:])]
    torch.testing.assert_close(small.predict(values, ragged), whole, rtol=1e-12, atol=1e-12)
    assert sum(b.shape[0] for b in small.iter_predict(values, [pool])) == pool.shape[0]


def test_bandwidth_is_deterministic_per_seed_and_uses_the_subset():
    land, _, _ = _data(n_land=120)
    cfg = PropagateConfig(bandwidth_sample=30, seed=3)
    s1 = KernelRidge.fit(land, cfg).sigma
    assert s1 == KernelRidge.fit(land, cfg).sigma
    assert s1 == median_bandwidth(torch.from_numpy(land), 30, 3)
    other = KernelRidge.fit(land, dataclasses.replace(cfg, seed=4)).sigma
    assert other != s1  # a different subset, hence a different median
    full = KernelRidge.fit(land, PropagateConfig(bandwidth_sample=1000)).sigma
    assert full != s1


def test_config_and_input_errors_are_one_liners():
    with pytest.raises(ConfigError, match="PropagateConfig.ridge"):
        PropagateConfig(ridge=0.0)
    with pytest.raises(ConfigError, match="PropagateConfig.kernel"):
        PropagateConfig(kernel="poly")
    land, pool, values = _data()
    krr = KernelRidge.fit(land, PropagateConfig())
    with pytest.raises(DataError, match=r"emb_chunks\[0\] has D=5"):
        krr.predict(values, [pool[:, :5]])
    with pytest.raises(DataError, match="one per landmark"):
        krr.predict(values[:3], [pool])
    assert PropagateConfig().fingerprint() != PropagateConfig(ridge=0.1).fingerprint()


# -- shared coefficients --------------------------------------------------------------------------------------
def _coefficient_store(tmp_path, n=300, extra=50, dim=8):
    from idistill_core.store.lance import EmbeddingStore, StoreIdentity

    rng = np.random.default_rng(0)
    store = EmbeddingStore.open(tmp_path, "emb", StoreIdentity("m", "r", dim))
    ids = [f"p{i:04d}" for i in range(n + extra)]
    store.insert_missing(ids, rng.normal(size=(n + extra, dim)).astype(np.float32))
    pool = ids[extra:][::-1]  # a pool that is not the table and not in table order
    return store, pool


def test_shared_coefficients_times_values_equal_the_fitted_ridge_on_exactly_the_pool(tmp_path):
    from idistill_core.pipeline.propagation import build_coefficients

    store, pool = _coefficient_store(tmp_path)
    landmarks = pool[::10]
    config = PropagateConfig(ridge=0.05)
    table, report = build_coefficients(store, pool, landmarks, config, chunk_rows=64)
    assert report.rows == len(pool) and report.chunks_computed == 5
    values = np.random.default_rng(1).normal(size=(len(landmarks), 3))
    ids, scores = table.propagate(values)
    assert sorted(ids) == sorted(pool)  # the other 50 rows of the store never appear
    ridge = KernelRidge.fit(store.read(landmarks), config)
    expected = ridge.predict(values, [store.read(ids)]).numpy()
    # coefficients are stored in float32: a relative error of a few float32 eps per term, L terms
    tol = 8 * np.finfo(np.float32).eps * np.abs(ridge.coefficients(store.read(ids)).numpy()) @ np.abs(values)
    assert (np.abs(scores - expected) <= tol + 1e-12).all()
    np.testing.assert_allclose(table.read(pool[:3]), ridge.coefficients(store.read(pool[:3])).numpy(), rtol=1e-6, atol=1e-7)


def test_coefficient_build_resumes_from_the_last_committed_chunk(tmp_path):
    from idistill_core.pipeline.propagation import build_coefficients

    store, pool = _coefficient_store(tmp_path, n=200, extra=0)
    landmarks = pool[:20]

    class Killed(Exception):
        pass

    def kill_after_two(done, total):
        if done == 2:
            raise Killed

    with pytest.raises(Killed):
        build_coefficients(store, pool, landmarks, PropagateConfig(), chunk_rows=50, on_chunk=kill_after_two)
    table, report = build_coefficients(store, pool, landmarks, PropagateConfig(), chunk_rows=50)
    assert (report.chunks_reused, report.chunks_computed) == (2, 2) and report.rows == 200
    fresh, _ = build_coefficients(store, pool, landmarks, PropagateConfig(ridge=0.02), chunk_rows=50)
    assert fresh.name != table.name  # another config is another table
    ids, matrix = table.matrix()
    order = np.argsort(ids)
    expected = KernelRidge.fit(store.read(landmarks)).coefficients(store.read(sorted(ids))).numpy()
    np.testing.assert_allclose(matrix[order], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_extra_landmarks_by_block_elimination_equal_a_refit_on_all_landmarks(kernel):
    """A target's refinement landmarks reuse the shared coefficients: C·v + (K_xR − C·B) S⁻¹ (v_R − C_R v) must be
    the KRR fit on all L + R landmarks (same σ and absolute ridge), solved directly here."""
    gen = torch.Generator().manual_seed(7)
    pool = torch.randn(120, 6, generator=gen, dtype=torch.float64)
    lm, extra = pool[:30], pool[40:45]
    values = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    extra_values = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    model = KernelRidge.fit(lm, PropagateConfig(kernel=kernel, ridge=0.05))
    ext = model.extend(extra)
    c = model.coefficients(pool)
    got = ext.correction(c @ values, c @ ext.cross, model.kernel_between(pool, extra), values, extra_values)
    both = torch.cat([lm, extra])
    k = model.kernel_between(both, both) + model.ridge_abs * torch.eye(35, dtype=torch.float64)
    alpha = torch.linalg.solve(k, torch.cat([values, extra_values]))
    want = model.kernel_between(pool, both) @ alpha
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # and the refinement changes the prediction (the test is not vacuous)
    assert float((got - c @ values).abs().max()) > 1e-2


# -- coefficient tables keyed by content, extended incrementally, garbage-collected (issue 24) ---------------------
class _KernelRows:
    """Counts the pool rows whose coefficients are computed (every row goes through ``KernelRidge.coefficients``)."""

    def __init__(self, monkeypatch):
        self.rows = 0
        real = KernelRidge.coefficients

        def counted(model, x):
            self.rows += len(x)
            return real(model, x)

        monkeypatch.setattr(KernelRidge, "coefficients", counted)


def test_a_grown_pool_costs_its_new_rows_and_an_unrelated_append_or_compaction_costs_nothing(tmp_path, monkeypatch):
    from idistill_core.pipeline.propagation import build_coefficients

    store, pool = _coefficient_store(tmp_path, n=300, extra=50)
    landmarks = pool[::10]
    kernel = _KernelRows(monkeypatch)
    table, report = build_coefficients(store, pool, landmarks, PropagateConfig(), chunk_rows=64)
    assert kernel.rows == report.rows_computed == 300 and report.rows == 300

    # another pool's rows land in the embeddings table and the table is compacted: a new Lance version, same rows
    rng = np.random.default_rng(5)
    store.insert_missing([f"other{i}" for i in range(40)], rng.normal(size=(40, 8)).astype(np.float32))
    store.optimize()
    kernel.rows = 0
    again, report = build_coefficients(store, pool, landmarks, PropagateConfig(), chunk_rows=64)
    assert again.name == table.name and kernel.rows == 0
    assert (report.rows_computed, report.rows_reused, report.chunks_computed) == (0, 300, 0)

    # the pool grows by 7 rows (landmarks unchanged): 7 kernel rows, the same table, exactly the pool in it
    new = [f"new{i}" for i in range(7)]
    store.insert_missing(new, rng.normal(size=(7, 8)).astype(np.float32))
    grown = pool + new
    kernel.rows = 0
    extended, report = build_coefficients(store, grown, landmarks, PropagateConfig(), chunk_rows=64)
    assert extended.name == table.name and kernel.rows == report.rows_computed == 7
    assert (report.rows, report.rows_reused, report.chunks_computed) == (307, 300, 1)
    ids, matrix = extended.matrix()
    assert sorted(ids) == sorted(grown)
    ridge = KernelRidge.fit(store.read(landmarks))
    np.testing.assert_allclose(matrix, ridge.coefficients(store.read(ids)).numpy(), rtol=1e-6, atol=1e-7)
    assert table.count() == 300  # a reader pinned at the earlier version still sees its pool

    # the pool shrinks: the rows that left are deleted, nothing is computed
    kernel.rows = 0
    shrunk, report = build_coefficients(store, grown[5:], landmarks, PropagateConfig(), chunk_rows=64)
    assert kernel.rows == 0 and report.rows_removed == 5 and sorted(shrunk.matrix()[0]) == sorted(grown[5:])

    # other landmarks (or their vectors) are another table
    other, report = build_coefficients(store, pool, pool[1::10], PropagateConfig(), chunk_rows=64)
    assert other.name != table.name and report.rows_computed == 300


def test_garbage_collection_drops_stale_tables_and_keeps_the_current_one(tmp_path):
    from datetime import timedelta

    from idistill_core.pipeline.propagation import CoefficientTable, build_coefficients

    store, pool = _coefficient_store(tmp_path, n=120, extra=0)
    current, _ = build_coefficients(store, pool, pool[:12], PropagateConfig(), chunk_rows=50)
    old, _ = build_coefficients(store, pool, pool[:12], PropagateConfig(ridge=0.05), chunk_rows=50)
    recent = CoefficientTable.collect_garbage(store.uri, keep=[current.name])  # 7 days: both are too young
    assert recent["dropped"] == [] and set(recent["kept"]) == {current.name, old.name}
    result = CoefficientTable.collect_garbage(store.uri, keep=[current.name], older_than=timedelta(0))
    assert result["dropped"] == [old.name] and result["kept"] == [current.name]
    import lancedb

    names = lancedb.connect(store.uri).list_tables().tables
    assert old.name not in names and current.name in names and store.name in names  # embeddings untouched
    assert CoefficientTable.open(store.uri, current.name).count() == 120
