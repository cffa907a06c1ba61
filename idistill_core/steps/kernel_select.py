"""Step 4a: choose the propagation kernel, RBF bandwidth and ridge by cross-validation over the landmarks.

Propagation must stay target-independent (one coefficient table serves every target), so the selection cannot
look at any target's landmark values. It does not need to: every target's landmark value is an inner product
``g_j · t`` of the landmark's (unit-normalised, sketched) gradient with a target direction, and the
coefficients are linear, so a kernel that predicts the held-out landmarks' gradient VECTORS ``g_j`` from their
embeddings predicts ``g_j · t`` for every ``t`` (the error on ``g · t`` is ``(ĝ − g) · t``). The selection is
therefore vector-valued KRR from the landmark embeddings to the landmark gradients, K-fold over the landmarks,
with the error measured on ``g · r`` for a few seeded Gaussian directions ``r`` (``E[(e·r)²] = ‖e‖²`` for
``r ~ N(0, I/M)``, so this estimates the gradient error without carrying ``P``-wide responses), and the grid
point with the lowest held-out error wins (ties: the first in grid order).

Not in the paper, which fixes the kernel (RBF, median heuristic) and the damping; ``auto`` is opt-in.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from idistill_core.errors import DataError
from idistill_core.steps.propagate import (
    AUTO,
    PropagateConfig,
    _as_float64,
    median_bandwidth,
    squared_distances,
)

logger = logging.getLogger("idistill")


@dataclass(frozen=True)
class CVPoint:
    """One grid point and its cross-validated error."""

    kernel: str
    bandwidth_scale: float | None
    """Multiplier of the median σ (None for the linear kernel)."""
    ridge: float
    """Relative ridge (``ridge · mean(diag K_train)`` on the diagonal)."""
    error: float
    """Held-out squared error of ``g · r`` over all folds, relative to the held-out ``Σ (g · r)²`` (1 = no better
    than predicting zero)."""


@dataclass(frozen=True)
class KernelSelection:
    """What :func:`select_kernel` chose and the whole CV grid behind the choice."""

    config: PropagateConfig
    """The input config with every ``auto`` field replaced by the chosen value (what the coefficients use)."""
    sigma: float | None
    """The chosen RBF bandwidth (``bandwidth_scale`` × median σ); None for the linear kernel."""
    median_sigma: float | None
    grid: tuple[CVPoint, ...]
    folds: int
    directions: int
    """Random directions scored (0 = whole gradient vectors)."""
    landmarks: int

    @property
    def best(self) -> CVPoint:
        return min(self.grid, key=lambda p: p.error)

    @property
    def worst(self) -> CVPoint:
        return max(self.grid, key=lambda p: p.error)

    def summary(self) -> str:
        c = self.config
        band = f" bandwidth={c.bandwidth_scale:g}×median (σ={self.sigma:.4g})" if c.kernel == "rbf" else ""
        return (
            f"kernel={c.kernel}{band} ridge={c.ridge:g} chosen by {self.folds}-fold CV over {self.landmarks} "
            f"landmarks: relative error {self.best.error:.4f} (worst grid point {self.worst.error:.4f})"
        )

    def markdown(self) -> str:
        """The CV grid as a markdown table (rows: kernel and bandwidth; columns: ridge), best marked **bold**."""
        ridges = sorted({p.ridge for p in self.grid})
        rows: dict[tuple[str, float | None], dict[float, float]] = {}
        for p in self.grid:
            rows.setdefault((p.kernel, p.bandwidth_scale), {})[p.ridge] = p.error
        best = self.best
        lines = ["| kernel | bandwidth × median | " + " | ".join(f"ridge {r:g}" for r in ridges) + " |",
                 "|---|---|" + "---|" * len(ridges)]
        for (kernel, scale), errors in rows.items():
            cells = []
            for r in ridges:
                e = errors.get(r)
                text = "" if e is None else f"{e:.4f}"
                if e is not None and (kernel, scale, r) == (best.kernel, best.bandwidth_scale, best.ridge):
                    text = f"**{text}**"
                cells.append(text)
            lines.append(f"| {kernel} | {'' if scale is None else f'{scale:g}'} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def metadata(self) -> dict:
        """Flat values for asset metadata / JSON (the grid as a list of dicts)."""
        c = self.config
        return {
            "kernel": c.kernel,
            "bandwidth_scale": float(c.bandwidth_scale) if c.kernel == "rbf" else None,
            "sigma": self.sigma,
            "ridge": float(c.ridge),
            "cv_error": self.best.error,
            "cv_error_worst": self.worst.error,
            "cv_folds": self.folds,
            "cv_directions": self.directions,
            "grid": [dataclasses.asdict(p) for p in self.grid],
        }


def _folds(n: int, k: int, seed: int) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[i::k] for i in range(k)]


def select_kernel(
    landmark_emb: torch.Tensor | np.ndarray, landmark_grads: torch.Tensor | np.ndarray, config: PropagateConfig
) -> KernelSelection:
    """Choose every ``auto`` field of ``config`` by K-fold CV of vector-valued KRR over the landmarks.

    Each ``auto`` field is searched over its grid (``kernel``: rbf and linear; ``bandwidth_scale``:
    ``bandwidth_grid``, rbf only; ``ridge``: ``ridge_grid``); fixed fields are one-point grids. The RBF σ uses
    the same median heuristic of all landmarks as the final fit. One eigendecomposition per fold and kernel
    serves every ridge.

    Args:
        landmark_emb: ``(L, D)`` landmark embeddings.
        landmark_grads: ``(L, P)`` the same landmarks' gradients, as the landmark values are computed from
            (unit-normalised, projected, preconditioned / centred when the recipe does so).
        config: with at least one ``auto`` field (a config without one comes back unchanged, with its one point).

    Returns:
        :class:`KernelSelection`; ``selection.config`` has no ``auto`` left. Deterministic for ``config.seed``.
    """
    emb = _as_float64(landmark_emb, "landmark_emb")
    grads = _as_float64(landmark_grads, "landmark_grads")
    n = emb.shape[0]
    if grads.shape[0] != n:
        raise DataError(f"landmark_grads has {grads.shape[0]} rows; landmark_emb has {n}")
    if n < 4:
        raise DataError(f"kernel selection needs at least 4 landmarks for cross-validation; got {n}")
    k = min(config.cv_folds, n)
    m = config.cv_directions
    if m and m < grads.shape[1]:
        g = torch.Generator().manual_seed(config.seed)
        directions = torch.randn(grads.shape[1], m, generator=g, dtype=torch.float64) / m**0.5
        y = grads @ directions
    else:
        m, y = 0, grads
    kernels = ("rbf", "linear") if config.kernel == AUTO else (config.kernel,)
    scales = config.bandwidth_grid if config.bandwidth_scale == AUTO else (float(config.bandwidth_scale),)
    ridges = config.ridge_grid if config.ridge == AUTO else (float(config.ridge),)
    median = median_bandwidth(emb, config.bandwidth_sample, config.seed) if "rbf" in kernels else None
    folds = _folds(n, k, config.seed)
    total = float((y * y).sum()) or 1.0
    distances = squared_distances(emb, emb) if median is not None else None
    grid: list[CVPoint] = []
    for kernel in kernels:
        for scale in scales if kernel == "rbf" else (None,):
            full = emb @ emb.T if kernel == "linear" else torch.exp(-distances / (2 * (median * scale) ** 2))
            sse = np.zeros(len(ridges))
            for test in folds:
                train = torch.ones(n, dtype=torch.bool)
                train[test] = False
                k_tr = full[train][:, train]
                evals, vecs = torch.linalg.eigh(k_tr)
                evals = evals.clamp_min(0)  # round-off below zero on a PSD kernel
                base = float(k_tr.diagonal().mean())
                projected = vecs.T @ y[train]
                k_te = full[test][:, train] @ vecs
                for i, ridge in enumerate(ridges):
                    pred = k_te @ (projected / (evals + ridge * base)[:, None])
                    sse[i] += float(((pred - y[test]) ** 2).sum())
            for ridge, error in zip(ridges, sse, strict=True):
                grid.append(CVPoint(kernel, None if scale is None else float(scale), float(ridge), float(error / total)))
    best = min(range(len(grid)), key=lambda i: (grid[i].error, i))
    point = grid[best]
    chosen = dataclasses.replace(
        config,
        kernel=point.kernel,
        ridge=point.ridge,
        bandwidth_scale=point.bandwidth_scale if point.bandwidth_scale is not None
        else (1.0 if config.bandwidth_scale == AUTO else config.bandwidth_scale),
    )
    sigma = median * point.bandwidth_scale if point.kernel == "rbf" else None
    selection = KernelSelection(chosen, sigma, median, tuple(grid), k, m, n)
    logger.info("propagate: %s", selection.summary())
    return selection
