"""run_selection with gradient centring and with CV-chosen propagation, against independent numpy computations."""

import dataclasses

import numpy as np

from idistill_core.pipeline.gradients import compute_gradients
from idistill_core.pipeline.landmarks import choose_landmarks
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.pipeline.run import run_selection
from idistill_core.steps.propagate import PropagateConfig
from tests.core.test_pipeline import RECIPE


def _small(data, n=40):
    """A 40-sample slice of the session pool: three selection runs stay quick."""
    pool, targets = data
    return pool.select(range(n)), targets


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _centred_mean_scores(g, t, mean):
    return _unit(g - mean) @ _unit(t - mean).mean(axis=0)


def test_exact_with_centring_scores_the_pool_mean_centred_cosines(tiny, data, tmp_path):
    pool, targets = _small(data)
    model, tokenizer = tiny.model, tiny.tokenizer
    recipe = dataclasses.replace(RECIPE, method="exact", center=True)
    got = run_selection(model, tokenizer, tiny.fingerprint, pool, targets, 10, recipe, tmp_path)
    g = compute_gradients(model, tokenizer, pool, got.outcome.sample_ids, RECIPE.gradients).grads.double().numpy()
    t = compute_gradients(model, tokenizer, targets, None, RECIPE.gradients).grads.double().numpy()
    np.testing.assert_allclose(got.outcome.scores[:, 0] if got.outcome.scores.ndim == 2 else got.outcome.scores,
                               _centred_mean_scores(g, t, g.mean(axis=0)), rtol=1e-4, atol=1e-6)


def test_id_centres_on_the_landmark_mean_and_off_is_the_plain_score(tiny, data, tmp_path):
    pool, targets = _small(data)
    model, tokenizer = tiny.model, tiny.tokenizer
    pool_ids = list(pool["sample_id"])
    landmark_ids, holdout_ids = choose_landmarks(pool_ids, RECIPE.num_landmarks, RECIPE.num_holdout, RECIPE.seed)
    g = compute_gradients(model, tokenizer, pool, landmark_ids + holdout_ids, RECIPE.gradients).grads.double().numpy()
    t = compute_gradients(model, tokenizer, targets, None, RECIPE.gradients).grads.double().numpy()
    exact_rows = landmark_ids + holdout_ids
    for center in (False, True):
        report = run_selection(
            model, tokenizer, tiny.fingerprint, pool, targets, 10, dataclasses.replace(RECIPE, center=center),
            tmp_path / str(center),
        )
        position = {s: i for i, s in enumerate(report.outcome.sample_ids)}
        got = np.array([report.outcome.scores[position[s]] for s in exact_rows]).reshape(-1)
        # landmarks and held-out samples keep their exact values: the (centred) cosine with the mean target
        mean = g[: len(landmark_ids)].mean(axis=0)  # ID only knows its landmarks' gradients
        expected = _centred_mean_scores(g, t, mean) if center else g @ t.mean(axis=0)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
        assert "(fixed)" in report.propagation and report.kernel_selection is None
    # centring is first order's: the second order's real-step model ignores it, so the two combine
    assert SelectionRecipe(center=True, order="second").center


def test_run_selection_with_auto_propagation_reports_the_chosen_values(tiny, data, tmp_path):
    pool, targets = _small(data)
    model, tokenizer = tiny.model, tiny.tokenizer
    auto = PropagateConfig(kernel="auto", ridge="auto", bandwidth_scale="auto", bandwidth_grid=(0.5, 1.0, 2.0), cv_folds=4)
    recipe = dataclasses.replace(RECIPE, propagate=auto)
    report = run_selection(model, tokenizer, tiny.fingerprint, pool, targets, 10, recipe, tmp_path)
    sel = report.kernel_selection
    assert sel is not None and not sel.config.needs_selection and sel.landmarks == RECIPE.num_landmarks
    assert report.propagation == sel.summary() and "chosen by 4-fold CV" in report.propagation
    assert len(sel.grid) == 3 * 5 + 5
