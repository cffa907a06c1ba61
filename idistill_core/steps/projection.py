"""Johnson–Lindenstrauss projections for JVP embeddings and per-sample gradients (paper §2.2, §3.5).

- ``CountSketchProjector`` (the gradient default): signed CountSketch (sparse JL): every input coordinate goes
  to ONE of ``out_dim`` buckets with a random sign, ``y_j = sum_{i: h(i)=j} s_i x_i``. One pass, ``in_dim``
  additions per vector, no padding, applied tensor by tensor (``project_pieces``) so a gradient split over
  layers is never concatenated. Inner products are unbiased with
  ``Var[<Sx,Sy>] = (|x|^2 |y|^2 + <x,y>^2 - 2 sum_i x_i^2 y_i^2) / out_dim`` (a dense JL map has the same
  variance without the last term).
- ``SRHTProjector``: block subsampled randomized Hadamard transform: the input is cut into blocks of ``2^k``
  coordinates; each block gets its own random signs, an orthonormal Walsh–Hadamard transform and its own
  uniform sample of ``out_dim`` coordinates; the blocks' samples are summed. One block (inputs up to
  ``2^block_log2`` coordinates) is the classic SRHT of the official "Had1G" projector. ``O(d log 2^k)`` per
  vector; no full-length padding or permutation at any size.
- ``RademacherProjector``: dense ±1/sqrt(k) matrix, as the official code's TRAK projector (used for the JVP
  embeddings, whose inputs are a few thousand coordinates). Generated from a seeded generator in row chunks.

No per-coordinate table is ever stored or copied: CountSketch's bucket and sign and SRHT's signs are a hash of
``(seed, coordinate)`` (:func:`coordinate_hash`: 32-bit integer arithmetic, identical on every device),
computed chunk by chunk on the input's device, so memory is ``O(chunk)`` whatever ``in_dim`` is (1.44B
coordinates for Llama-2-7B's ``down_proj``). The only state is small and built once per device: SRHT's sampled
coordinates (``out_dim`` per block, drawn on the CPU from a seeded generator) and the Rademacher matrix when it
is small enough to keep. Every map is a deterministic function of ``(in_dim, out_dim, seed)`` (and SRHT's
``block_log2``); ``PROJECTORS`` names them for configs (``proj_type``).

Just over 500 lines because the three maps share the coordinate hash, the chunking and the FWHT; the hash is the
part to move out if a fourth map joins.
"""

from __future__ import annotations

import math

import torch

from idistill_core.errors import ConfigError

__all__ = [
    "PROJECTION_REVISION",
    "PROJECTORS",
    "CountSketchProjector",
    "RademacherProjector",
    "SRHTProjector",
    "coordinate_hash",
    "fwht",
    "make_projector",
]

PROJECTION_REVISION = 2
"""Revision of the CountSketch and SRHT maps (2: hashed coordinates, block SRHT). Gradients sketched by another
revision are different numbers for the same config; ``GradientConfig`` carries it into its fingerprint."""

_BLOCK_BITS = 30
"""Hash keys are ``(block, offset)`` with ``offset < 2^30``: every block has its own salts, so the 32-bit
arithmetic never wraps two coordinates of one block onto the same key."""
_CHUNK = 1 << 16
"""Coordinates hashed per step on a CPU: 256 KiB of int32, so the dozen passes of the mixer stay in the L2
cache. Accelerators take ``_DEVICE_CHUNK`` (16 MiB: a few large kernels, not 15 launches per 64k coordinates)."""
_DEVICE_CHUNK = 1 << 22
CACHE_BYTES = 256 << 20
"""Default budget of a CountSketch's per-device code cache: inputs up to 32M coordinates (8-byte codes;
SmolLM2-135M's ``down_proj``: 26.5M) keep their hashed codes on the device after the first call; larger ones
are hashed on every call."""
_SMALL_WHT_LOG2 = 4
"""The WHT's innermost ``2^4`` points run as one ±1 matmul per cache-sized chunk; radix-2 butterflies over
16-float strides and below are strided loops that cost 3x more per pass (measured on a 2^20 block)."""


def _chunk_for(device: torch.device) -> int:
    return _CHUNK if device.type == "cpu" else _DEVICE_CHUNK

_U64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser on a Python int (exact 64-bit arithmetic): derives independent salts."""
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _salts(seed: int, stream: int, block: int) -> tuple[int, int]:
    """``(a, b)``: an odd multiplier and an offset (signed int32 values) for one ``(seed, stream, block)``."""
    key = _splitmix64(_splitmix64(_splitmix64(seed & _U64) ^ stream) ^ block)
    return _int32(key | 1), _int32(key >> 32)


_M1, _M2 = _int32(0x85EBCA6B), _int32(0xC2B2AE35)


def _fmix32_(h: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser in place on int32 ``h`` (wrapping multiplies; masked, i.e. logical,
    right shifts), ``tmp`` scratch of the same shape."""
    for shift, mult in ((16, _M1), (13, _M2), (16, None)):
        torch.bitwise_right_shift(h, shift, out=tmp)
        tmp.bitwise_and_((1 << (32 - shift)) - 1)
        h.bitwise_xor_(tmp)
        if mult is not None:
            h.mul_(mult)
    return h


class _Hasher:
    """``coordinate_hash`` chunk by chunk, with its ``arange`` kept per device (one per projector: no module
    state)."""

    def __init__(self):
        self._ramp: dict[str, torch.Tensor] = {}

    def ramp(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._ramp:
            self._ramp[key] = torch.arange(_chunk_for(device), dtype=torch.int32, device=device)
        return self._ramp[key]

    def __call__(self, seed: int, stream: int, start: int, count: int, device, tmp=None) -> torch.Tensor:
        """int32 hashes of coordinates ``start .. start+count-1``: one span of ``_spans`` (within a 2^30 block)."""
        block, offset = start >> _BLOCK_BITS, start & ((1 << _BLOCK_BITS) - 1)
        a, b = _salts(seed, stream, block)
        # h = fmix32(a * offset + b), with a * (offset0 + t) + b = a * t + (a * offset0 + b) (mod 2^32)
        h = self.ramp(device)[:count] * a
        h.add_(_int32(a * offset + b))
        return _fmix32_(h, torch.empty_like(h) if tmp is None else tmp[:count])


def _spans(start: int, stop: int, device: torch.device | str = "cpu"):
    """``(s, e)`` sub-ranges of ``[start, stop)`` of at most one hashing chunk for ``device``, never crossing a
    2^30 block boundary (so each is one salted affine run of the hash)."""
    chunk = _chunk_for(torch.device(device))
    s = start
    while s < stop:
        boundary = ((s >> _BLOCK_BITS) + 1) << _BLOCK_BITS
        e = min(stop, s + chunk, boundary)
        yield s, e
        s = e


def coordinate_hash(seed: int, stream: int, start: int, stop: int, device="cpu") -> torch.Tensor:
    """The 32-bit hash of every coordinate in ``[start, stop)`` as int32 (for tests and the dense definitions).

    ``h(c) = fmix32(a·o + b mod 2^32)`` with ``o = c mod 2^30`` and ``(a odd, b)`` derived by SplitMix64 from
    ``(seed, stream, c // 2^30)``: within a block the key ``a·o + b`` is a bijection of ``o``, and MurmurHash3's
    finaliser (a bijection with full avalanche) spreads it. Integer arithmetic only, so every device gives the
    same bits. ``stream`` separates uses (0: CountSketch buckets/signs, 1: SRHT signs).
    """
    device = torch.device(device)
    hasher = _Hasher()
    parts = [hasher(seed, stream, s, e - s, device) for s, e in _spans(start, stop, device)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32, device=device)


def _hadamard_pm1(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ±1 Sylvester Hadamard matrix ``(n, n)`` (unnormalised), ``n`` a power of two."""
    h = torch.ones((1, 1), dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def _fwht_rows_(buf: torch.Tensor, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """Unnormalised WHT of every row of the contiguous ``(R, n)`` ``buf``, in place; returns ``buf``.

    Radix-2 butterflies ``(a, b) -> (a + b, a - b)`` on reshaped views, one pass per bit of the index from
    stride 16 up (``log2(n) - 4`` passes, scratch ``n / 2`` per row), then the 16 innermost points of every
    group as one ±1 matmul per cache-sized chunk. The passes act on different bits of the index, so their
    order does not matter (the transform is their Kronecker product).
    """
    rows, n = buf.shape
    small = min(n.bit_length() - 1, _SMALL_WHT_LOG2)
    f = 1 << small
    if n > f:
        if tmp is None or tmp.numel() < rows * n // 2:
            tmp = torch.empty(rows * n // 2, dtype=buf.dtype, device=buf.device)
        h = f
        while h < n:
            view = buf.view(rows, n // (2 * h), 2, h)
            a, b = view[:, :, 0], view[:, :, 1]
            t = tmp[: rows * n // 2].view(rows, n // (2 * h), h)
            torch.sub(a, b, out=t)
            a.add_(b)
            b.copy_(t)
            h *= 2
    if f > 1:
        hm = _hadamard_pm1(f, buf.dtype, buf.device)
        flat = buf.view(-1, f)
        step = max(1, _CHUNK // f)
        for s in range(0, flat.shape[0], step):
            part = flat[s : s + step]
            part.copy_(part @ hm)
    return buf


def fwht(x: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """Orthonormal fast Walsh–Hadamard transform over the last dimension.

    In-place radix-2 butterflies (``log2(n)`` passes of add/sub over reshaped views, the innermost 16 points
    as one matmul; see ``_fwht_rows_``), then one scaling by ``1/sqrt(n)``.

    Args:
        x: ``(..., n)`` floating tensor, ``n`` a power of two.
        overwrite: ``x`` may be used as scratch (the caller's own, contiguous buffer): the transform is then
            computed in ``x`` itself, holding ``n / 2`` extra floats per row instead of a copy.

    Returns:
        ``(..., n)`` ``H_n x`` with ``H_n`` symmetric and orthonormal (``H_n H_n = I``), in Sylvester
        (natural) order.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ConfigError(f"fwht needs a power-of-two last dimension; got {n}")
    if overwrite and x.is_contiguous():
        buf = x.view(-1, n)
    else:
        buf = x.reshape(-1, n).clone(memory_format=torch.contiguous_format)
    _fwht_rows_(buf)
    buf.mul_(1.0 / math.sqrt(n))
    return buf.view(x.shape)


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
    out_dim: int

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, in_dim)`` -> ``(B, out_dim)`` float32."""
        x = _check_input(type(self).__name__, x, self.in_dim)
        return self._project([x])

    def project_pieces(self, pieces: list[torch.Tensor], scale: torch.Tensor | None = None) -> torch.Tensor:
        """The sketch of ``cat(pieces, dim=1) * scale`` (``scale``: ``(B, 1)`` or None) without concatenating."""
        _check_pieces(type(self).__name__, pieces, self.in_dim)
        out = self._project(pieces)
        return out if scale is None else out * scale  # linear: scaling after equals scaling before

    def _project(self, pieces: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class CountSketchProjector(_Projector):
    """Signed CountSketch ``R^in_dim -> R^out_dim``: ``y_j = sum_{i: h(i)=j} s_i x_i``.

    Bucket and sign of coordinate ``i`` come from one 32-bit hash (:func:`coordinate_hash`, stream 0): its
    low 31 bits modulo ``2·out_dim`` give a code ``c``; the bucket is ``c mod out_dim`` and the sign is ``-1``
    when ``c >= out_dim``. The sketch adds every coordinate into ``2·out_dim`` accumulators by its code and
    returns ``acc[:, :P] - acc[:, P:]``: no sign multiply, no table, memory ``O(chunk + B·P)``.
    ``E[|y|^2] = |x|^2``; a one-hot input keeps its norm exactly.

    The codes of inputs up to ``cache_bytes / 8`` coordinates are hashed once per device, on that device, and
    kept there (a hashed call costs ~2x an index-add, measured on one EPYC core); larger inputs are hashed
    chunk by chunk on every call, so the state never exceeds ``cache_bytes`` per device. Either way the
    numbers are the same.

    Args:
        in_dim: input dimension (any size: coordinates are hashed, never stored beyond the cache).
        out_dim: number of buckets ``P`` (``2P <= 2^31``).
        seed: seeds the hash.
        cache_bytes: per-device budget for keeping the codes (0: always hash).
    """

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0, cache_bytes: int = CACHE_BYTES):
        _check_dims("CountSketchProjector", in_dim, out_dim)
        if 2 * out_dim > 1 << 31:
            raise ConfigError(f"CountSketchProjector.out_dim must be <= 2^30; got {out_dim}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.seed = seed
        self.cache_bytes = cache_bytes
        self._cache: dict[str, torch.Tensor] = {}
        self._hash = _Hasher()

    def state_bytes(self) -> int:
        """Bytes this projector holds on all devices together (the code caches)."""
        return sum(t.numel() * t.element_size() for t in self._cache.values())

    def _cached_codes(self, device: torch.device) -> torch.Tensor | None:
        if 8 * self.in_dim > self.cache_bytes:
            return None
        key = str(device)
        if key not in self._cache:
            self._cache[key] = self.codes(0, self.in_dim, device)
        return self._cache[key]

    def codes(self, start: int, stop: int, device="cpu") -> torch.Tensor:
        """int64 codes in ``[0, 2P)`` of coordinates ``[start, stop)``: bucket ``c mod P``, sign ``+`` iff ``c < P``."""
        h = coordinate_hash(self.seed, 0, start, stop, device)
        return self._to_codes(h)

    def _to_codes(self, h: torch.Tensor) -> torch.Tensor:
        two_p = 2 * self.out_dim
        h.bitwise_and_(0x7FFFFFFF)
        if two_p & (two_p - 1) == 0:
            h.bitwise_and_(two_p - 1)
        else:
            h.remainder_(two_p)
        return h.long()  # index_add_ with int32 indices takes a slow path (20x on CPU)

    def buckets_and_signs(self, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(buckets int64, signs float32 ±1)`` of coordinates ``[start, stop)`` (tests, dense definition)."""
        codes = self.codes(start, self.in_dim if stop is None else stop)
        return codes % self.out_dim, torch.where(codes < self.out_dim, 1.0, -1.0)

    def _project(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        first = pieces[0]
        device = first.device
        acc = torch.zeros((first.shape[0], 2 * self.out_dim), dtype=torch.float32, device=device)
        cached = self._cached_codes(device)
        tmp = None if cached is not None else torch.empty(_chunk_for(device), dtype=torch.int32, device=device)
        start = 0
        for piece in pieces:
            if cached is not None:
                acc.index_add_(1, cached[start : start + piece.shape[1]], piece.to(torch.float32))
            else:
                for s, e in _spans(start, start + piece.shape[1], device):
                    codes = self._to_codes(self._hash(self.seed, 0, s, e - s, device, tmp))
                    acc.index_add_(1, codes, piece[:, s - start : e - start].to(torch.float32))
            start += piece.shape[1]
        return acc[:, : self.out_dim] - acc[:, self.out_dim :]


class SRHTProjector(_Projector):
    """Block subsampled randomized Hadamard transform ``R^in_dim -> R^out_dim`` (paper §3.5).

    ``y = sum_j sqrt(K / P) · S_j H_K D_j x_j`` over the blocks ``x_j`` of ``K`` consecutive coordinates
    (``K`` a power of two, the last block zero-padded), with ``D_j`` random ±1 signs (hashed,
    :func:`coordinate_hash` stream 1), ``H_K`` the orthonormal WHT and ``S_j`` a uniform sample of ``P``
    distinct rows of block ``j`` (its own draw per block). With one block this is the classic SRHT.

    Why it is an unbiased JL sketch: each block's term is an SRHT of ``x_j`` (``H_K D_j`` orthogonal, then
    ``P`` of ``K`` coordinates sampled uniformly and rescaled by ``sqrt(K/P)``), so
    ``E|y_j|^2 = |x_j|^2`` and ``E<y_j(x), y_j(z)> = <x_j, z_j>``; the cross terms ``<y_j(x), y_k(z)>``,
    ``j != k``, are linear in the independent mean-zero signs ``D_j`` and ``D_k``, so they vanish in
    expectation: ``E<Sx, Sz> = <x, z>``. Each block is flattened by its own randomized Hadamard and
    sampled ``P`` times, so a vector whose mass sits in one block is sketched as well as by a single SRHT
    (what a single sampling over all blocks would not do); blocks add like independent JL maps. This is the
    block SRHT of Balabanov, Beaupère, Grigori & Lederer (2022), an oblivious subspace embedding with the
    SRHT's guarantees up to constants.

    Cost ``O(in_dim · log K)`` with memory ``O(B · K)``, never a full-length padded copy or permutation:
    at 7B ``down_proj`` (1.44B coordinates) the default ``K = 2^20`` gives 1,376 blocks and keeps
    ``1,376 · P`` sampled positions (86 MiB of int64 at ``P = 8192``) per device.

    Args:
        in_dim: input dimension.
        out_dim: output dimension ``P``, at most ``K``.
        seed: seeds the signs and the samples.
        block_log2: ``K = 2^block_log2`` caps the block size; inputs up to ``K`` use one block of
            ``next_pow2(in_dim)``. Raised to ``next_pow2(out_dim)`` when ``P`` is larger.
    """

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0, block_log2: int = 20):
        _check_dims("SRHTProjector", in_dim, out_dim)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.seed = seed
        full = 1 << max(0, (in_dim - 1).bit_length())
        self.block = min(full, max(1 << block_log2, 1 << max(0, (out_dim - 1).bit_length())))
        self.num_blocks = -(-in_dim // self.block)
        self.n_pad = self.num_blocks * self.block
        if out_dim > self.block:
            raise ConfigError(
                f"SRHTProjector.out_dim must be <= {self.block} (the Hadamard block for in_dim={in_dim}); "
                f"got {out_dim}"
            )
        self._index: dict[tuple[str, int], torch.Tensor] = {}
        self._hash = _Hasher()

    def sample_index(self, block: int, device="cpu") -> torch.Tensor:
        """Sorted int64 positions (``out_dim`` distinct, in ``[0, K)``) sampled in block ``block``; drawn once on
        the CPU from a generator seeded by ``(seed, block)`` and kept per device (``P`` int64s per block)."""
        key = (str(torch.device(device)), block)
        if key not in self._index:
            cpu = (str(torch.device("cpu")), block)
            if cpu not in self._index:
                self._index[cpu] = self._draw(block)
            self._index[key] = self._index[cpu].to(device)
        return self._index[key]

    def _draw(self, block: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_splitmix64(_splitmix64(self.seed & _U64) ^ (2 << 40) ^ block) >> 1)
        k, p = self.block, self.out_dim
        if 2 * p > k:  # a large share of a small block: a permutation of the block (at most 2P entries)
            return torch.randperm(k, generator=gen)[:p].sort().values
        # Distinct values of i.i.d. uniform draws form a uniform random subset given their number; a uniform
        # P-subset of it is a uniform P-subset of the block. 2P draws give >= P distinct values when P <= K/2
        # but a few times in a million; draw again then.
        while True:
            found = torch.randint(0, k, (2 * p,), generator=gen).unique()
            if found.numel() >= p:
                return found[torch.randperm(found.numel(), generator=gen)[:p]].sort().values

    def signs(self, start: int, stop: int, device="cpu") -> torch.Tensor:
        """float32 ±1 signs ``D`` of coordinates ``[start, stop)`` (padding coordinates have signs too)."""
        h = coordinate_hash(self.seed, 1, start, stop, device)
        return torch.where(h < 0, -1.0, 1.0)

    def _apply_signs(self, view: torch.Tensor, start: int, htmp: torch.Tensor | None = None) -> torch.Tensor:
        """``D`` in place on ``view`` ``(B, n)``, the coordinates ``[start, start + n)``."""
        for s, e in _spans(start, start + view.shape[1], view.device):
            h = self._hash(self.seed, 1, s, e - s, view.device, htmp)
            view[:, s - start : e - start].mul_(torch.where(h < 0, -1.0, 1.0))  # the hash's top bit
        return view

    def _project(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        first = pieces[0]
        rows, device = first.shape[0], first.device
        out = torch.zeros((rows, self.out_dim), dtype=torch.float32, device=device)
        buf = torch.empty((rows, self.block), dtype=torch.float32, device=device)
        tmp = torch.empty(rows * self.block // 2, dtype=torch.float32, device=device)
        htmp = torch.empty(_chunk_for(device), dtype=torch.int32, device=device)
        bounds, start = [], 0
        for piece in pieces:
            bounds.append((start, start + piece.shape[1], piece))
            start += piece.shape[1]
        for j in range(self.num_blocks):
            lo, hi = j * self.block, (j + 1) * self.block
            buf.zero_()
            for p_lo, p_hi, piece in bounds:  # copy this block's share of every piece that overlaps it
                s, e = max(lo, p_lo), min(hi, p_hi)
                if s < e:
                    buf[:, s - lo : e - lo].copy_(piece[:, s - p_lo : e - p_lo])
            self._apply_signs(buf[:, : min(hi, self.in_dim) - lo], lo, htmp)  # padding is zero: no signs
            _fwht_rows_(buf, tmp)
            out += buf[:, self.sample_index(j, device)]
        return out.mul_(1.0 / math.sqrt(self.out_dim))  # sqrt(K/P) times the WHT's 1/sqrt(K)


class RademacherProjector(_Projector):
    """Dense Rademacher JL projection ``y = x R`` with ``R_ij = ±1/sqrt(out_dim)`` (paper §2.2).

    ``R`` (``(in_dim, out_dim)``) is generated row-chunk by row-chunk from one seeded CPU generator, so it
    is the same matrix for any batch and device. When it has at most ``cache_limit`` entries it is kept, and
    copied to each device once (cached per device); otherwise it is regenerated chunk by chunk on every
    ``project`` call (never fully resident). Dense generation costs ``in_dim * out_dim`` draws, so this is
    only sensible for small inputs (embeddings: ``m*H`` in the low thousands); sketch gradients with
    CountSketch or SRHT.

    Args:
        in_dim: input dimension.
        out_dim: output dimension (any size; up-projection is allowed).
        seed: seeds the matrix.
        chunk: input coordinates per generated chunk: bounds the memory of a chunked projection; the
            generator's draws form one stream, so the matrix is the same for any chunk (a test pins it).
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
        self._on_device: dict[str, torch.Tensor] = {}

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

    def _resident(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = self._matrix.to(device)
        return self._on_device[key]

    def _project(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        x = pieces[0] if len(pieces) == 1 else torch.cat([p.to(torch.float32) for p in pieces], dim=1)
        x = x.to(torch.float32)
        if self._matrix is not None:
            return x @ self._resident(x.device)
        out = torch.zeros((x.shape[0], self.out_dim), dtype=torch.float32, device=x.device)
        for start, stop, block in self._chunks():
            out += x[:, start:stop] @ block.to(x.device)
        return out


PROJECTORS = {"srht": SRHTProjector, "rademacher": RademacherProjector, "countsketch": CountSketchProjector}
"""``proj_type`` names: ``countsketch`` (O(d), per tensor, no padding: the gradient default), ``srht`` (block
randomized Hadamard, O(d log K)), ``rademacher`` (dense, small d only)."""


def make_projector(proj_type: str, in_dim: int, out_dim: int, seed: int) -> _Projector:
    if proj_type not in PROJECTORS:
        raise ConfigError(f"proj_type must be one of {', '.join(PROJECTORS)}; got {proj_type!r}")
    return PROJECTORS[proj_type](in_dim, out_dim, seed=seed)
