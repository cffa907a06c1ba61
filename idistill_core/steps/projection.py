"""Johnson–Lindenstrauss projections for JVP embeddings and per-sample gradients (paper §2.2, §3.5).

- ``RademacherProjector``: dense ±1/sqrt(k) matrix, as the official code's TRAK projector (used for the
  JVP embeddings). The matrix is regenerated from the seed in row chunks of ``chunk`` input coordinates
  when it would be too large to keep (above ``cache_limit`` entries), so memory stays at one chunk.
  Dense generation costs ``in_dim * out_dim`` random draws per call, so it is only sensible for small
  inputs (embeddings: ``m*H`` in the low thousands). For large gradients use ``SRHTProjector``.
- ``SRHTProjector``: subsampled randomized Hadamard transform (the official "Had1G" projector, CPU
  version): zero-pad to the next power of two, random signs, orthonormal Walsh–Hadamard transform,
  keep ``out_dim`` coordinates of a seeded permutation, scale ``sqrt(n_pad / out_dim)``. Costs
  ``O(n_pad log n_pad)`` per vector and one sign vector of ``n_pad`` float32s.

- ``CountSketchProjector``: signed CountSketch (sparse JL): every input coordinate goes to ONE of
  ``out_dim`` buckets with a random sign, ``y_j = sum_{i: h(i)=j} s_i x_i``. One pass, ``in_dim``
  multiply-adds per vector, no padding, and it can be applied tensor by tensor (``project_pieces``) so
  a gradient split over layers is never concatenated. Inner products are unbiased with
  ``Var[<Sx,Sy>] = (|x|^2 |y|^2 + <x,y>^2 - 2 sum_i x_i^2 y_i^2) / out_dim`` (a dense JL map has the
  same variance without the last term). Keeps ``in_dim`` int64 buckets and float32 signs resident.

All preserve squared norms in expectation and inner products up to ``O(1/sqrt(out_dim))`` relative
error, and all are deterministic functions of ``(in_dim, out_dim, seed)``. ``PROJECTORS`` names them for
configs (``proj_type``).
"""

from __future__ import annotations

import math

import torch

from idistill_core.errors import ConfigError

__all__ = [
    "PROJECTORS",
    "CountSketchProjector",
    "RademacherProjector",
    "SRHTProjector",
    "fwht",
    "make_projector",
]

# Largest Walsh–Hadamard factor applied as one dense matmul; 2^7 keeps the GEMM efficient and the
# number of passes over the data small (log_128 n).
_WHT_BLOCK_LOG2 = 7


def _hadamard_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix ``(n, n)``, ``n`` a power of two."""
    h = torch.ones((1, 1), dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h / math.sqrt(n)


def fwht(x: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """Orthonormal fast Walsh–Hadamard transform over the last dimension.

    The ``n``-point transform is the Kronecker product of small Hadamard factors (at most 128 points
    each); each factor is applied to its axis of the reshaped input as one matmul, so there is no
    Python loop over elements and only ``ceil(log2(n) / 7)`` passes over the data.

    Args:
        x: ``(..., n)`` floating tensor, ``n`` a power of two.
        overwrite: ``x`` may be used as scratch (the caller's own, contiguous buffer): the passes then
            alternate between ``x`` and one new buffer, so a large transform holds two copies, not three.

    Returns:
        ``(..., n)`` ``H_n x`` with ``H_n`` symmetric and orthonormal (``H_n H_n = I``), in Sylvester
        (natural) order.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ConfigError(f"fwht needs a power-of-two last dimension; got {n}")
    log_n = n.bit_length() - 1
    lead = x.shape[:-1]
    out = x.reshape(-1, n)
    # each pass writes into a buffer other than its input: x itself when allowed, else at most two new ones
    scratch = [out] if overwrite and x.is_contiguous() else []
    done = 0  # log2 of the product of the factors already applied (the trailing axis)
    while done < log_n:
        step = min(_WHT_BLOCK_LOG2, log_n - done)
        f = 1 << step
        inner = 1 << done
        h = _hadamard_matrix(f, out.dtype, out.device)
        dest = next((b for b in scratch if b.data_ptr() != out.data_ptr()), None)
        if dest is None:
            dest = torch.empty_like(out, memory_format=torch.contiguous_format)
            scratch.append(dest)
        # H_n = H_outer ⊗ H_f ⊗ H_inner in Sylvester order; apply H_f (symmetric) to its own axis as
        # a batched (f, f) @ (f, inner) matmul, which needs no permuted copies (3x faster than einsum).
        if inner == 1:
            torch.matmul(out.reshape(-1, f), h, out=dest.view(-1, f))
        else:
            torch.matmul(h, out.reshape(-1, f, inner), out=dest.view(-1, f, inner))
        out = dest
        done += step
    return out.reshape(*lead, n)


def _check_dims(name: str, in_dim: int, out_dim: int) -> None:
    if in_dim < 1:
        raise ConfigError(f"{name}.in_dim must be >= 1; got {in_dim}")
    if out_dim < 1:
        raise ConfigError(f"{name}.out_dim must be >= 1; got {out_dim}")


def _check_input(name: str, x: torch.Tensor, in_dim: int) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != in_dim:
        raise ConfigError(f"{name}.project expects (B, {in_dim}); got {tuple(x.shape)}")
    return x.to(torch.float32)


def _check_pieces(name: str, pieces: list[torch.Tensor], in_dim: int) -> None:
    total = sum(p.shape[1] for p in pieces)
    if not pieces or total != in_dim or any(p.dim() != 2 or p.shape[0] != pieces[0].shape[0] for p in pieces):
        shapes = [tuple(p.shape) for p in pieces]
        raise ConfigError(f"{name}.project_pieces expects (B, d_k) pieces summing to {in_dim}; got {shapes}")


class _Projector:
    in_dim: int

    def project(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def project_pieces(self, pieces: list[torch.Tensor], scale: torch.Tensor | None = None) -> torch.Tensor:
        """``project(cat(pieces, dim=1) * scale)`` (``scale``: ``(B, 1)`` or None); dense maps concatenate."""
        _check_pieces(type(self).__name__, pieces, self.in_dim)
        x = torch.cat([p.to(torch.float32) for p in pieces], dim=1)
        return self.project(x if scale is None else x * scale)


class CountSketchProjector(_Projector):
    """Signed CountSketch ``R^in_dim -> R^out_dim``: ``y_j = sum_{i: h(i)=j} s_i x_i``.

    ``h`` (uniform buckets) and ``s`` (±1) are drawn from one ``torch.Generator(seed)`` in blocks of
    ``chunk`` coordinates (buckets first, then signs, per block), so the map is fixed by
    ``(in_dim, out_dim, seed, chunk)`` and a piece of the input only needs its own slice of ``h``, ``s``.
    ``E[|y|^2] = |x|^2``; a one-hot input keeps its norm exactly.

    Args:
        in_dim: input dimension.
        out_dim: number of buckets (any size; > in_dim is allowed but pointless).
        seed: seeds buckets and signs.
        chunk: coordinates per generated block (part of the map's definition).
    """

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0, chunk: int = 1 << 22):
        _check_dims("CountSketchProjector", in_dim, out_dim)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        buckets, signs = [], []
        for start in range(0, in_dim, chunk):
            n = min(chunk, in_dim - start)
            buckets.append(torch.randint(0, out_dim, (n,), generator=gen))
            signs.append(torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8))
        self.buckets = torch.cat(buckets)
        # float32 signs: the multiply is ~25% faster than with int8 signs, for 4 bytes per coordinate
        self.signs = torch.cat(signs).float() * 2 - 1

    def _add(self, out: torch.Tensor, piece: torch.Tensor, start: int) -> None:
        stop = start + piece.shape[1]
        signs = self.signs[start:stop].to(piece.device)
        out.index_add_(1, self.buckets[start:stop].to(piece.device), piece.to(torch.float32) * signs)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, in_dim)`` -> ``(B, out_dim)`` float32."""
        x = _check_input("CountSketchProjector", x, self.in_dim)
        out = torch.zeros((x.shape[0], self.out_dim), dtype=torch.float32, device=x.device)
        self._add(out, x, 0)
        return out

    def project_pieces(self, pieces: list[torch.Tensor], scale: torch.Tensor | None = None) -> torch.Tensor:
        """The sketch of ``cat(pieces, dim=1) * scale`` without concatenating: one pass per piece."""
        _check_pieces("CountSketchProjector", pieces, self.in_dim)
        out = torch.zeros((pieces[0].shape[0], self.out_dim), dtype=torch.float32, device=pieces[0].device)
        start = 0
        for piece in pieces:
            self._add(out, piece, start)
            start += piece.shape[1]
        return out if scale is None else out * scale  # linear: scaling after equals scaling before


class SRHTProjector(_Projector):
    """Subsampled randomized Hadamard transform ``R^in_dim -> R^out_dim`` (paper §3.5).

    ``y = sqrt(n_pad / out_dim) * S H D pad(x)`` with ``D`` random ±1 signs, ``H`` the orthonormal
    WHT of size ``n_pad = next_pow2(in_dim)`` and ``S`` the first ``out_dim`` rows of a seeded
    permutation. ``E[|y|^2] = |x|^2``.

    Args:
        in_dim: input dimension.
        out_dim: output dimension, at most ``n_pad``.
        seed: seeds both the signs and the permutation.
    """

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0):
        _check_dims("SRHTProjector", in_dim, out_dim)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.seed = seed
        self.n_pad = 1 << max(0, (in_dim - 1).bit_length())
        if out_dim > self.n_pad:
            raise ConfigError(
                f"SRHTProjector.out_dim must be <= {self.n_pad} (next power of two of in_dim={in_dim}); "
                f"got {out_dim}"
            )
        gen = torch.Generator().manual_seed(seed)
        self.signs = torch.randint(0, 2, (self.n_pad,), generator=gen, dtype=torch.int8).float() * 2 - 1
        self.index = torch.randperm(self.n_pad, generator=gen)[:out_dim]
        self.scale = math.sqrt(self.n_pad / out_dim)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, in_dim)`` -> ``(B, out_dim)`` float32."""
        x = _check_input("SRHTProjector", x, self.in_dim)
        padded = torch.zeros((x.shape[0], self.n_pad), dtype=torch.float32, device=x.device)
        padded[:, : self.in_dim] = x
        padded *= self.signs.to(x.device)
        return fwht(padded, overwrite=True)[:, self.index.to(x.device)] * self.scale


class RademacherProjector(_Projector):
    """Dense Rademacher JL projection ``y = x R`` with ``R_ij = ±1/sqrt(out_dim)`` (paper §2.2).

    ``R`` (``(in_dim, out_dim)``) is generated row-chunk by row-chunk from one seeded generator, so it
    is the same matrix for any batch. It is kept in memory when it has at most ``cache_limit``
    entries, otherwise regenerated chunk by chunk on every ``project`` call (never fully resident).

    Args:
        in_dim: input dimension.
        out_dim: output dimension (any size; up-projection is allowed).
        seed: seeds the matrix.
        chunk: input coordinates per generated chunk; part of the matrix's definition together
            with the seed.
        cache_limit: keep ``R`` resident when ``in_dim * out_dim`` is at most this many entries.
    """

    def __init__(
        self, in_dim: int, out_dim: int, seed: int = 0, chunk: int = 1024, cache_limit: int = 1 << 24
    ):
        _check_dims("RademacherProjector", in_dim, out_dim)
        if chunk < 1:
            raise ConfigError(f"RademacherProjector.chunk must be >= 1; got {chunk}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.seed = seed
        self.chunk = chunk
        self._matrix = self.matrix() if in_dim * out_dim <= cache_limit else None

    def _chunks(self):
        gen = torch.Generator().manual_seed(self.seed)
        scale = 1.0 / math.sqrt(self.out_dim)
        for start in range(0, self.in_dim, self.chunk):
            stop = min(start + self.chunk, self.in_dim)
            bits = torch.randint(0, 2, (stop - start, self.out_dim), generator=gen, dtype=torch.int8)
            yield start, stop, (bits.float() * 2 - 1) * scale

    def matrix(self) -> torch.Tensor:
        """The full ``(in_dim, out_dim)`` float32 matrix (for tests and small dims only)."""
        return torch.cat([block for _, _, block in self._chunks()], dim=0)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, in_dim)`` -> ``(B, out_dim)`` float32."""
        x = _check_input("RademacherProjector", x, self.in_dim)
        if self._matrix is not None:
            return x @ self._matrix.to(x.device)
        out = torch.zeros((x.shape[0], self.out_dim), dtype=torch.float32, device=x.device)
        for start, stop, block in self._chunks():
            out += x[:, start:stop] @ block.to(x.device)
        return out


PROJECTORS = {"srht": SRHTProjector, "rademacher": RademacherProjector, "countsketch": CountSketchProjector}
"""``proj_type`` names: ``srht`` (O(d log d), pads to a power of two), ``rademacher`` (dense, small d only),
``countsketch`` (O(d), per-tensor, no padding)."""


def make_projector(proj_type: str, in_dim: int, out_dim: int, seed: int) -> _Projector:
    if proj_type not in PROJECTORS:
        raise ConfigError(f"proj_type must be one of {', '.join(PROJECTORS)}; got {proj_type!r}")
    return PROJECTORS[proj_type](in_dim, out_dim, seed=seed)
