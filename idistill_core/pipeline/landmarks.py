"""Step 2 over the store: which pool samples become landmarks, and the adaptive strategy's second round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from idistill_core.pipeline.propagation import propagate_scores
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.steps.landmarks import LandmarkConfig
from idistill_core.store.lance import EmbeddingStore


def choose_landmarks(
    sample_ids: Sequence[str],
    num_landmarks: int,
    num_holdout: int,
    seed: int,
    config: LandmarkConfig | None = None,
    embeddings: np.ndarray | None = None,
) -> tuple[list[str], list[str]]:
    """Landmarks and disjoint held-out samples, deterministic for a seed (see :mod:`idistill_core.steps.landmarks`).

    The default (uniform random, without replacement over sorted ids) is the paper's; with
    ``strategy='adaptive'`` this is its first, random round (:func:`adaptive_landmarks` adds the rest).
    """
    from idistill_core.steps import landmarks

    return landmarks.choose(sample_ids, num_landmarks, num_holdout, seed, config, embeddings)


def adaptive_round(
    store: EmbeddingStore,
    pool_ids: Sequence[str],
    landmark_ids: Sequence[str],
    lm_values: np.ndarray,
    holdout_ids: Sequence[str],
    budget: int,
    recipe: SelectionRecipe,
    exact_values: Callable[[list[str]], np.ndarray],
    landmark_grads: torch.Tensor | np.ndarray | None = None,
) -> tuple[list[str], np.ndarray]:
    """The adaptive strategy's second round: propagate the first-round landmarks, take the rest of the budget
    nearest the top-k cut of that estimate (``exact_values(ids)`` gives their ``(n, T)`` exact values), and
    return all landmarks with their values (the caller refits). ``landmark_grads`` (first-round landmarks) are
    needed when the propagate config has ``auto`` fields."""
    from idistill_core.steps import landmarks

    ids, scores, _ = propagate_scores(
        store, pool_ids, landmark_ids, lm_values, recipe.propagate, landmark_grads=landmark_grads
    )
    more = landmarks.boundary_picks(
        ids, scores, budget, recipe.num_landmarks - len(landmark_ids), [*landmark_ids, *holdout_ids]
    )
    if not more:
        return list(landmark_ids), lm_values
    return [*landmark_ids, *more], np.concatenate([lm_values, exact_values(more)])
