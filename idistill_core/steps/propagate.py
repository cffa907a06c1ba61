"""Step 4: propagate landmark influences to the whole pool by kernel ridge regression (paper §4.4).

``p̂ = K(E, L) (K(L, L) + λI)⁻¹ P_L``: one Cholesky factorisation of the landmark kernel serves every
target column and every pool chunk, so memory is ``O(chunk · L + N · T)``.

Deviation from the official code: the RBF bandwidth (median heuristic) is computed ONCE from a
seeded subset of landmarks, not re-drawn for every target sample (paper §12, item 14), so results are
deterministic and identical across targets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from idistill_core.errors import ConfigError, DataError, NumericalError
from idistill_core.store.hashing import config_fingerprint

logger = logging.getLogger("idistill")


AUTO = "auto"


@dataclass(frozen=True)
class PropagateConfig:
    """How landmark influences are spread to the pool.

    ``kernel``, ``ridge`` and ``bandwidth_scale`` may each be ``auto``: chosen by K-fold cross-validation over
    the landmarks (:func:`idistill_core.steps.kernel_select.select_kernel`), which predicts the landmarks' own
    gradients and so keeps the coefficients target-independent. Fixed values (the default) skip it.
    """

    kernel: Literal["rbf", "linear", "auto"] = "rbf"
    """``rbf``: exp(−‖x−y‖²/(2σ²)), σ by the median heuristic (official code); ``linear``: ``x·y``; ``auto``: the
    one of the two with the lower cross-validated error."""
    ridge: float | Literal["auto"] = 1e-2
    """Relative ridge: ``ridge · mean(diag K)`` is added to the diagonal (official ``damp``); > 0; ``auto``: the
    best of ``ridge_grid``."""
    bandwidth_scale: float | Literal["auto"] = 1.0
    """RBF σ = ``bandwidth_scale`` × the median-heuristic σ (1 = the official code); > 0; ``auto``: the best of
    ``bandwidth_grid``."""
    bandwidth_sample: int = 1000
    """At most this many landmarks (seeded subset) enter the median heuristic; >= 2."""
    chunk_size: int = 4096
    """Pool rows per kernel block; bounds memory at ``chunk_size · L`` floats; >= 1."""
    seed: int = 0
    """Seed of the bandwidth subset, the cross-validation folds and the random directions."""
    ridge_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    """Relative ridges tried when ``ridge`` is ``auto``."""
    bandwidth_grid: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    """Multipliers of the median σ tried when ``bandwidth_scale`` is ``auto``."""
    cv_folds: int = 5
    """Folds over the landmarks for ``auto`` (capped at L); >= 2."""
    cv_directions: int = 64
    """``auto`` scores held-out predictions of ``g · r`` for this many seeded Gaussian directions ``r`` (an
    unbiased estimate of the gradient error at a fraction of the cost); 0 = the whole gradient vectors."""

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= 2**32 - 1:
            raise ConfigError(f"PropagateConfig.seed must be in [0, 2**32 - 1]; got {self.seed}")
        if self.kernel not in ("rbf", "linear", AUTO):
            raise ConfigError(f"PropagateConfig.kernel must be 'rbf', 'linear' or 'auto'; got {self.kernel!r}")
        for name in ("ridge", "bandwidth_scale"):
            value = getattr(self, name)
            if value != AUTO and (isinstance(value, (str, bool)) or not float(value) > 0):
                raise ConfigError(f"PropagateConfig.{name} must be > 0 or 'auto'; got {value!r}")
        for name in ("ridge_grid", "bandwidth_grid"):
            grid = getattr(self, name)
            if not isinstance(grid, tuple) or not grid or any(isinstance(v, (str, bool)) or not v > 0 for v in grid):
                raise ConfigError(f"PropagateConfig.{name} must be a non-empty tuple of values > 0; got {grid!r}")
        if self.cv_folds < 2:
            raise ConfigError(f"PropagateConfig.cv_folds must be >= 2; got {self.cv_folds}")
        if self.cv_directions < 0:
            raise ConfigError(f"PropagateConfig.cv_directions must be >= 0; got {self.cv_directions}")
        if self.bandwidth_sample < 2:
            raise ConfigError(f"PropagateConfig.bandwidth_sample must be >= 2; got {self.bandwidth_sample}")
        if self.chunk_size < 1:
            raise ConfigError(f"PropagateConfig.chunk_size must be >= 1; got {self.chunk_size}")

    @property
    def needs_selection(self) -> bool:
        """True when a field is ``auto`` (the landmark gradients are needed to fit)."""
        return AUTO in (self.kernel, self.ridge, self.bandwidth_scale)

    def fingerprint(self) -> str:
        return config_fingerprint(self)


def _as_float64(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach()
    t = t.to(device="cpu", dtype=torch.float64)
    if t.ndim != 2:
        raise DataError(f"{name} must be 2-D; got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise NumericalError(f"{name} has non-finite entries")
    return t


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(n, m)`` squared Euclidean distances, clamped at 0 (the norm expansion can dip below)."""
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return d.clamp_min(0)


def median_bandwidth(emb: torch.Tensor, sample: int, seed: int) -> float:
    """σ = sqrt(median pairwise squared distance) over a seeded subset (off-diagonal pairs), floor 1e-6.

    The median is ``torch.median``'s lower median for an even number of pairs.

    Args:
        emb: ``(L, D)`` landmark embeddings.
        sample: subset size cap.
        seed: subset seed (``torch.Generator``).
    """
    n = emb.shape[0]
    if n > sample:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample]
        emb = emb[idx]
    d = squared_distances(emb, emb)
    iu = torch.triu_indices(d.shape[0], d.shape[0], offset=1)
    pairs = d[iu[0], iu[1]]
    if pairs.numel() == 0:
        return 1.0
    return max(float(pairs.median().sqrt()), 1e-6)


class KernelRidge:
    """Kernel ridge regression from landmark embeddings; fit once, predict any number of columns.

    Attributes:
        landmarks: ``(L, D)`` float64 landmark embeddings.
        config: the ``PropagateConfig``.
        sigma: RBF bandwidth (None for the linear kernel).
        ridge_abs: the absolute ridge ``config.ridge · mean(diag K)`` added to the diagonal.
    """

    def __init__(
        self,
        landmarks: torch.Tensor,
        config: PropagateConfig,
        sigma: float | None,
        ridge_abs: float,
        chol: torch.Tensor,
    ):
        self.landmarks = landmarks
        self.config = config
        self.sigma = sigma
        self.ridge_abs = ridge_abs
        self._chol = chol

    @classmethod
    def fit(
        cls, landmark_emb: torch.Tensor | np.ndarray, config: PropagateConfig | None = None
    ) -> KernelRidge:
        """Factorise ``K(L, L) + λI`` once (float64 Cholesky).

        Args:
            landmark_emb: ``(L, D)``.
            config: defaults to ``PropagateConfig()``.

        Raises:
            NumericalError: the regularised kernel is not positive definite (e.g. duplicate landmarks
                with a linear kernel and a ridge too small to matter).
        """
        config = config or PropagateConfig()
        if config.needs_selection:
            raise ConfigError(
                "PropagateConfig has 'auto' fields; choose them first with kernel_select.select_kernel "
                "(it needs the landmark gradients)"
            )
        lm = _as_float64(landmark_emb, "landmark_emb")
        if lm.shape[0] == 0:
            raise DataError("landmark_emb has no rows")
        sigma = None
        if config.kernel == "rbf":
            sigma = median_bandwidth(lm, config.bandwidth_sample, config.seed) * float(config.bandwidth_scale)
        model = cls(lm, config, sigma, 0.0, torch.empty(0))
        k = model.kernel(lm)
        ridge_abs = config.ridge * float(k.diagonal().mean())
        k.diagonal().add_(ridge_abs)
        chol, info = torch.linalg.cholesky_ex(k)
        if int(info) != 0:
            raise NumericalError(
                f"landmark kernel + ridge is not positive definite (ridge={config.ridge}); raise PropagateConfig.ridge"
            )
        model.ridge_abs = ridge_abs
        model._chol = chol
        logger.info(
            "propagate: fitted %s kernel on %d landmarks (sigma=%s)", config.kernel, lm.shape[0],
            "n/a" if sigma is None else f"{sigma:.4g}",
        )
        return model

    def kernel(self, emb: torch.Tensor) -> torch.Tensor:
        """``K(emb, landmarks)`` ``(n, L)`` float64."""
        return self.kernel_between(emb, self.landmarks)

    def kernel_between(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``K(x, y)`` ``(n, m)`` float64 with this fit's kernel and bandwidth."""
        if self.config.kernel == "linear":
            return x @ y.T
        return torch.exp(-squared_distances(x, y) / (2 * self.sigma**2))

    def _rows(self, emb_chunks: Iterable[torch.Tensor | np.ndarray]) -> Iterator[torch.Tensor]:
        d = self.landmarks.shape[1]
        step = self.config.chunk_size
        for i, chunk in enumerate(emb_chunks):
            block = _as_float64(chunk, f"emb_chunks[{i}]")
            if block.shape[1] != d:
                raise DataError(f"emb_chunks[{i}] has D={block.shape[1]}; landmarks have D={d}")
            for start in range(0, block.shape[0], step):
                yield block[start : start + step]

    def coefficients(self, emb_chunk: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``C = K(E, L)(K + λI)⁻¹`` ``(n, L)``: each row writes a sample as a landmark combination."""
        rows = [torch.cholesky_solve(self.kernel(b).T, self._chol).T for b in self._rows([emb_chunk])]
        return torch.cat(rows) if rows else torch.empty(0, self.landmarks.shape[0], dtype=torch.float64)

    def iter_predict(
        self, values: torch.Tensor | np.ndarray, emb_chunks: Iterable[torch.Tensor | np.ndarray]
    ) -> Iterator[torch.Tensor]:
        """Stream ``(n_i, T)`` predictions, one per ``chunk_size`` block of the input chunks."""
        vals = _as_float64(values, "values")
        if vals.shape[0] != self.landmarks.shape[0]:
            raise DataError(
                f"values has {vals.shape[0]} rows; expected one per landmark ({self.landmarks.shape[0]})"
            )
        alpha = torch.cholesky_solve(vals, self._chol)  # (L, T), solved once for all columns
        for block in self._rows(emb_chunks):
            yield self.kernel(block) @ alpha

    def predict(
        self, values: torch.Tensor | np.ndarray, emb_chunks: Iterable[torch.Tensor | np.ndarray]
    ) -> torch.Tensor:
        """Propagated values ``(N, T)`` float64 for the concatenated chunks, in input order.

        Args:
            values: ``(L, T)`` landmark values (e.g. ``P_L``; one column is ``(L, 1)``).
            emb_chunks: iterable of ``(n_i, D)`` pool embedding blocks (numpy or torch).
        """
        vals = _as_float64(values, "values")  # a Python list read as float32 first would lose its float64 digits
        parts = list(self.iter_predict(vals, emb_chunks))
        if not parts:
            return torch.empty(0, vals.shape[1], dtype=torch.float64)
        return torch.cat(parts)

    def extend(self, extra_emb: torch.Tensor | np.ndarray) -> LandmarkExtension:
        """``R`` more landmarks for this fit, without a refit (block elimination, below)."""
        return LandmarkExtension.of(self, extra_emb)


@dataclass
class LandmarkExtension:
    """``R`` extra landmarks added to a fitted :class:`KernelRidge` of ``L`` landmarks: the same predictions as a
    refit on all ``L + R`` (same kernel, σ and absolute ridge), from the ``L``-landmark coefficients ``C`` alone.

    With ``A = K_LL + λI``, ``B = K_LR``, ``C_x = K_xL A⁻¹`` and the Schur complement ``S = K_RR + λI − C_R B``,
    block elimination of the ``(L + R)`` system gives

        f(x) = C_x v_L + (K_xR − C_x B) S⁻¹ (v_R − C_R v_L).

    ``C_x v_L`` and ``C_x B`` come from one pass over a stored coefficient table (``C · [V | B]``), so a target
    that brings its own ``R`` landmarks (a refinement near its samples) costs ``R`` kernel columns and an
    ``R × R`` solve, not an ``N × (L + R)`` rebuild. Intercepts (``PropagateConfig.intercept``) are the caller's:
    centre ``v`` on the mean of all ``L + R`` values first.
    """

    model: KernelRidge
    emb: torch.Tensor
    """``(R, D)`` float64 extra landmark embeddings."""
    cross: torch.Tensor
    """``B = K_LR`` ``(L, R)``."""
    coefficients: torch.Tensor
    """``C_R`` ``(R, L)``: the extra landmarks' own coefficient rows."""
    schur_chol: torch.Tensor
    """Cholesky factor of ``S`` ``(R, R)``."""

    @classmethod
    def of(cls, model: KernelRidge, extra_emb: torch.Tensor | np.ndarray) -> LandmarkExtension:
        emb = _as_float64(extra_emb, "extra_emb")
        if emb.shape[1] != model.landmarks.shape[1]:
            raise DataError(f"extra_emb has D={emb.shape[1]}; landmarks have D={model.landmarks.shape[1]}")
        cross = model.kernel(emb).T  # (L, R)
        coefficients = torch.cholesky_solve(cross, model._chol).T  # (R, L) = K_RL A⁻¹
        schur = model.kernel_between(emb, emb) - coefficients @ cross
        schur = 0.5 * (schur + schur.T)
        schur.diagonal().add_(model.ridge_abs)
        chol, info = torch.linalg.cholesky_ex(schur)
        if int(info) != 0:
            raise NumericalError("extra landmarks make the kernel singular (a duplicate landmark?); raise the ridge")
        return cls(model, emb, cross, coefficients, chol)

    def correction(
        self,
        base: torch.Tensor | np.ndarray,
        coef_cross: torch.Tensor | np.ndarray,
        kernel_rows: torch.Tensor | np.ndarray,
        values: torch.Tensor | np.ndarray,
        extra_values: torch.Tensor | np.ndarray,
    ) -> torch.Tensor:
        """``f = base + (K_xR − C_x B) S⁻¹ (v_R − C_R v_L)`` for a block of ``n`` pool rows.

        Args:
            base: ``(n, T)`` ``C_x v_L`` (the L-landmark prediction).
            coef_cross: ``(n, R)`` ``C_x B``.
            kernel_rows: ``(n, R)`` ``K(x, extra landmarks)`` (:meth:`KernelRidge.kernel_between`).
            values: ``(L, T)`` ``v_L``; extra_values: ``(R, T)`` ``v_R``.
        """
        v_l, v_r = _as_float64(values, "values"), _as_float64(extra_values, "extra_values")
        gain = torch.cholesky_solve(v_r - self.coefficients @ v_l, self.schur_chol)  # (R, T)
        lift = _as_float64(kernel_rows, "kernel_rows") - _as_float64(coef_cross, "coef_cross")
        return _as_float64(base, "base") + lift @ gain
