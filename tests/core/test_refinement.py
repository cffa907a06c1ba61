"""Per-target refinement landmarks (pipeline/refinement.py, methods/id.py) against independent computations:
the round-robin nearest choice against a brute-force numpy loop, the extended propagation against a KRR refit on
all landmarks, and run_selection keeping the refinement's exact values where a run without it does not."""

import dataclasses

import numpy as np
import pytest
import torch

from idistill_core.pipeline.embeddings import open_store
from idistill_core.pipeline.propagation import build_coefficients
from idistill_core.pipeline.refinement import nearest_to_targets, refined_scores
from idistill_core.pipeline.run import run_selection
from idistill_core.steps.propagate import KernelRidge, PropagateConfig
from idistill_core.store.lance import EmbeddingStore, StoreIdentity
from tests.core.test_pipeline import RECIPE


def _brute_nearest(pool: np.ndarray, ids: list[str], targets: np.ndarray, count: int, exclude: set[str]) -> list[str]:
    ranked = []
    for t in targets:
        d = ((pool - t) ** 2).sum(axis=1)
        ranked.append([ids[i] for i in sorted(range(len(ids)), key=lambda i: (d[i], i))])
    picked: list[str] = []
    for rank in range(len(ids)):
        for column in ranked:
            s = column[rank]
            if s not in exclude and s not in picked and len(picked) < count:
                picked.append(s)
    return picked


def test_nearest_to_targets_is_round_robin_over_the_target_samples_and_streams_chunks():
    rng = np.random.default_rng(3)
    pool = rng.normal(size=(90, 5))
    ids = [f"p{i:02d}" for i in range(90)]
    targets = rng.normal(size=(3, 5))
    exclude = {ids[i] for i in (4, 17, 33)}
    chunks = [(ids[s : s + 16], pool[s : s + 16]) for s in range(0, 90, 16)]
    got = nearest_to_targets(chunks, targets, 10, exclude)
    assert got == _brute_nearest(pool, ids, targets, 10, exclude)
    # the first picks are each target sample's own nearest: no target example is left out
    assert got[:3] == [_brute_nearest(pool, ids, t[None], 1, exclude)[0] for t in targets]


@pytest.fixture
def store_and_table(tmp_path):
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(60, 6)).astype(np.float32)
    ids = [f"s{i:02d}" for i in range(60)]
    store = EmbeddingStore.open(tmp_path, "emb", StoreIdentity(model_fingerprint="m", recipe="r", dim=6, dtype="float32"))
    store.insert_missing(ids, emb)
    landmarks = ids[::4]
    config = PropagateConfig(ridge=0.05)
    table, _ = build_coefficients(store, ids, landmarks, config)
    return store, table, ids, emb.astype(np.float64), landmarks, config


def test_refined_scores_equal_a_krr_refit_on_the_shared_and_the_refinement_landmarks(store_and_table):
    store, table, ids, emb, landmarks, config = store_and_table
    rng = np.random.default_rng(6)
    values = rng.normal(size=(len(landmarks), 2))
    refine = ["s05", "s22", "s41"]
    refine_values = rng.normal(size=(3, 2))
    got_ids, got = refined_scores(store, table, None, values, refine, refine_values, config)
    # independent: one float64 solve on all L + R landmarks with the shared fit's sigma and absolute ridge
    model = KernelRidge.fit(emb[[ids.index(s) for s in landmarks]], config)
    both = torch.from_numpy(emb[[ids.index(s) for s in [*landmarks, *refine]]])
    k = model.kernel_between(both, both) + model.ridge_abs * torch.eye(len(both), dtype=torch.float64)
    alpha = torch.linalg.solve(k, torch.from_numpy(np.vstack([values, refine_values])))
    want = (model.kernel_between(torch.from_numpy(emb), both) @ alpha).numpy()
    position = {s: i for i, s in enumerate(got_ids)}
    np.testing.assert_allclose(got[[position[s] for s in ids]], want, rtol=0, atol=2e-5)  # float32 coefficients
    # without refinement it is the shared table's C · V
    plain_ids, plain = refined_scores(store, table, None, values, [], np.zeros((0, 2)), config)
    assert not np.allclose(plain, got[[position[s] for s in plain_ids]], atol=1e-3)


def test_run_selection_adds_the_nearest_pool_samples_as_exact_landmarks(tiny, data, tmp_path):
    from idistill_core.methods.id import target_embeddings

    pool, targets = data
    pool = pool.select(range(80))
    model, tokenizer = tiny.model, tiny.tokenizer
    recipe = dataclasses.replace(RECIPE, num_landmarks=12, num_holdout=4, refine_landmarks=6)
    report = run_selection(model, tokenizer, tiny.fingerprint, pool, targets, 10, recipe, tmp_path / "on")
    assert report.sizes["refinement"] == 6
    # the refinement ids are the round-robin nearest to the dev samples, with their exact (centred) values
    from idistill_core.pipeline.landmarks import choose_landmarks
    from idistill_core.pipeline.recipe import resolve_recipe

    resolved, _ = resolve_recipe(recipe, model)
    store = open_store(tmp_path / "on", "embeddings", tiny.fingerprint, resolved, model.config.hidden_size)
    pool_ids = list(pool["sample_id"])
    lm, ho = choose_landmarks(pool_ids, 12, 4, recipe.seed, recipe.landmarks)
    want = _brute_nearest(
        store.read(pool_ids).astype(np.float64), pool_ids,
        target_embeddings(model, tokenizer, targets, resolved).astype(np.float64), 6, set(lm) | set(ho),
    )
    from idistill_core.pipeline.gradients import compute_gradients

    g = compute_gradients(model, tokenizer, pool, lm + want, resolved.gradients).grads.numpy()
    t = compute_gradients(model, tokenizer, targets, None, resolved.gradients).grads.numpy()
    mean = g[:12].mean(axis=0)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    exact = unit(g[12:] - mean) @ unit(t - mean).mean(axis=0)
    position = {s: i for i, s in enumerate(report.outcome.sample_ids)}
    np.testing.assert_allclose([report.outcome.scores[position[s]] for s in want], exact, rtol=1e-4, atol=1e-6)
    off = run_selection(model, tokenizer, tiny.fingerprint, pool, targets, 10,
                        dataclasses.replace(recipe, refine_landmarks=0), tmp_path / "off")
    assert "refinement" not in off.sizes
    got_off = [off.outcome.scores[position[s]] for s in want]
    assert not np.allclose(got_off, exact, rtol=1e-4, atol=1e-6)  # without it they are propagated estimates
