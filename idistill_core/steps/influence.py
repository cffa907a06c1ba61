"""Step 3, first order: landmark influence ``P_L = G_L G_Tᵀ`` and its aggregation over target samples (paper §1.5).

With unit-normalised gradients (the released code's choice) each entry is a cosine. ``aggregate='mean'`` is
the paper's mean target gradient; ``rr`` keeps one column per target sample for the released code's
round-robin. Second order lives in :mod:`idistill_core.steps.second_order`, the QP in :mod:`idistill_core.steps.qp`.
"""

from __future__ import annotations

import numpy as np
import torch

from idistill_core.errors import DataError


def first_order(landmark_grads: torch.Tensor, target_grads: torch.Tensor) -> torch.Tensor:
    """Per-target landmark influences ``P_L = G_L G_Tᵀ`` (paper §4.3).

    Args:
        landmark_grads: ``(L, P)`` projected landmark gradients (Adam-preconditioned if used).
        target_grads: ``(T, P)`` projected target gradients.

    Returns:
        ``(L, T)``; with unit-normalised gradients entry ``(j, i)`` is a cosine similarity.
    """
    _check_grads(landmark_grads, target_grads)
    return landmark_grads @ target_grads.T


def center_gradients(grads: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``(g − μ) / ‖g − μ‖`` row-wise (a row equal to ``μ`` stays zero): the shared component removed.

    Optional (``SelectionRecipe.center``), not the paper's objective: the component all gradients share is part
    of the true first-order loss change; removing it ranks by what is specific to the target (docs/DESIGN.md).

    Args:
        grads: ``(n, P)`` unit-normalised gradients.
        mean: ``(P,)`` the mean gradient to remove (the landmarks' for ID, the pool's for ``exact``).
    """
    centred = grads - mean.to(grads.dtype)[None, :]
    return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)


def aggregated_first_order(landmark_grads: torch.Tensor, target_grads: torch.Tensor) -> torch.Tensor:
    """Influence on the mean target loss, ``p = G_L ḡ_T`` (paper §1.3).

    ``ḡ_T`` is the mean of the target gradient rows. With raw gradients that is exactly the gradient of
    the mean target loss. With unit-normalised gradients (the official code's choice) it is the mean of
    the unit directions, so ``p`` equals the row mean of ``first_order(...)`` — every target sample gets
    an equal share regardless of its gradient norm (paper §12, items 1–2).

    Args:
        landmark_grads: ``(L, P)``.
        target_grads: ``(T, P)``.

    Returns:
        ``(L,)``.
    """
    _check_grads(landmark_grads, target_grads)
    return landmark_grads @ target_grads.mean(dim=0)


def _check_grads(landmark_grads: torch.Tensor, target_grads: torch.Tensor) -> None:
    if landmark_grads.ndim != 2 or target_grads.ndim != 2:
        raise DataError(
            f"landmark_grads and target_grads must be 2-D; got shapes {tuple(landmark_grads.shape)} "
            f"and {tuple(target_grads.shape)}"
        )
    if landmark_grads.shape[1] != target_grads.shape[1]:
        raise DataError(
            f"landmark_grads has P={landmark_grads.shape[1]} but target_grads has P={target_grads.shape[1]}; "
            "both must use the same projection"
        )


def landmark_values(landmark_grads: torch.Tensor, target_grads: torch.Tensor, aggregate: str) -> np.ndarray:
    """P_L = G_L G_Tᵀ, ``(L, T)``; with aggregate='mean' the mean column ``(L, 1)`` (= G_L ḡ_T)."""
    from idistill_core.steps.influence import first_order

    values = first_order(landmark_grads, target_grads)
    values = values.detach().cpu().double().numpy() if torch.is_tensor(values) else np.asarray(values, dtype=np.float64)
    if aggregate == "mean":
        values = values.mean(axis=1, keepdims=True)
    return values
