"""Projection behaviour that mutmut's survivors showed no test pinned (docs/mutation-testing.md): the FWHT on
inputs that are not 2-D, CountSketch codes for a bucket count that is not a power of two, the out_dim and cache
boundaries, sub-ranges of the code table, and inputs in other dtypes. Each checks numbers against numpy or a
dense matrix built here, never against the projector's own tables."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from idistill_core.errors import ConfigError
from idistill_core.steps import projection
from idistill_core.steps.projection import (
    CountSketchProjector,
    RademacherProjector,
    SRHTProjector,
    coordinate_hash,
    fwht,
)


def _numpy_codes(seed: int, in_dim: int, out_dim: int) -> np.ndarray:
    """The documented code of every coordinate: the hash's low 31 bits modulo ``2·out_dim``."""
    h = coordinate_hash(seed, 0, 0, in_dim).numpy().astype(np.int64)
    return (h & 0x7FFFFFFF) % (2 * out_dim)


@pytest.mark.parametrize("shape", [(8,), (2, 3, 16)])
def test_fwht_transforms_the_last_dimension_of_vectors_and_of_stacked_matrices(shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    n = shape[-1]
    dense = torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64)) / np.sqrt(n)
    out = fwht(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x @ dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("out_dim", [3, 48, 64])  # 2P not a power of two (remainder) and a power of two (mask)
def test_countsketch_codes_are_the_hash_modulo_2p_for_any_bucket_count(out_dim):
    proj = CountSketchProjector(1000, out_dim, seed=5)
    codes = _numpy_codes(5, 1000, out_dim)
    assert proj.codes(0, 1000).numpy().tolist() == codes.tolist()
    assert len(set(codes.tolist())) == 2 * out_dim  # every bucket and both signs are reachable
    dense = np.zeros((out_dim, 1000))
    dense[codes % out_dim, np.arange(1000)] = np.where(codes < out_dim, 1.0, -1.0)
    x = torch.randn(3, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for cache_bytes in (0, 1 << 20):  # hashed per call, and cached
        got = CountSketchProjector(1000, out_dim, seed=5, cache_bytes=cache_bytes).project(x)
        np.testing.assert_allclose(got.double().numpy(), x.numpy() @ dense.T, rtol=0, atol=1e-4)


def test_countsketch_takes_up_to_2_to_the_30_buckets_and_names_itself_in_its_errors():
    assert CountSketchProjector(4, 1 << 30).out_dim == 1 << 30  # nothing is allocated until a projection
    with pytest.raises(ConfigError, match=r"CountSketchProjector\.out_dim must be <= 2\^30"):
        CountSketchProjector(4, (1 << 30) + 1)
    with pytest.raises(ConfigError, match=r"CountSketchProjector\.in_dim must be >= 1"):
        CountSketchProjector(0, 4)


def test_countsketch_caches_its_codes_exactly_when_they_fit_the_byte_budget():
    x = torch.ones(1, 100)
    fits = CountSketchProjector(100, 8, seed=1, cache_bytes=800)  # 100 int64 codes = 800 bytes
    over = CountSketchProjector(100, 8, seed=1, cache_bytes=799)
    assert torch.equal(fits.project(x), over.project(x))
    assert fits.state_bytes() == 800 and over.state_bytes() == 0


def test_countsketch_buckets_and_signs_of_a_range_are_that_range_of_the_whole_table():
    proj = CountSketchProjector(300, 7, seed=2)
    codes = _numpy_codes(2, 300, 7)
    buckets, signs = proj.buckets_and_signs(40, 90)
    assert buckets.tolist() == (codes[40:90] % 7).tolist()
    assert signs.tolist() == np.where(codes[40:90] < 7, 1.0, -1.0).tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("make", [
    lambda: CountSketchProjector(100, 16, seed=4, cache_bytes=0),
    lambda: CountSketchProjector(100, 16, seed=4),
    lambda: SRHTProjector(100, 16, seed=4),
    lambda: RademacherProjector(100, 16, seed=4),
    lambda: RademacherProjector(100, 16, seed=4, cache_limit=0),
], ids=["countsketch-hashed", "countsketch-cached", "srht", "rademacher", "rademacher-chunked"])
def test_pieces_in_another_dtype_are_sketched_as_their_float32_values(dtype, make):
    gen = torch.Generator().manual_seed(3)
    proj = make()
    for sizes in ((30, 70), (100,)):
        pieces = [torch.randn(2, n, generator=gen).to(dtype) for n in sizes]
        out = proj.project_pieces(pieces)
        assert out.dtype == torch.float32
        assert torch.equal(out, proj.project_pieces([p.float() for p in pieces]))


def _zero_hash_coordinate(stream: int) -> tuple[int, int]:
    """``(seed, coordinate)`` of a coordinate in block 0 whose hash is exactly 0: fmix32 maps only 0 to 0, so
    it is the offset ``o`` with ``a·o + b ≡ 0 (mod 2^32)``, i.e. ``o = -b·a⁻¹`` (``a`` is odd)."""
    for seed in range(1 << 16):  # each seed has a 2^-12 chance
        a, b = (v & 0xFFFFFFFF for v in projection._salts(seed, stream, 0))
        o = (-b * pow(a, -1, 1 << 32)) % (1 << 32)
        if 1 <= o < 1 << 20:
            return seed, o
    raise AssertionError("no seed below 2^16 puts the zero hash in the first 2^20 coordinates")


def test_srht_sign_of_the_coordinate_whose_hash_is_zero_is_plus_one():
    seed, o = _zero_hash_coordinate(1)
    assert coordinate_hash(seed, 1, o, o + 1).item() == 0
    proj = SRHTProjector(o + 2, 1, seed=seed)
    assert proj.signs(o - 1, o + 2).tolist()[1] == 1.0  # the sign is the hash's top bit: 0 is positive
    expected = np.where(coordinate_hash(seed, 1, o - 1, o + 2).numpy() < 0, -1.0, 1.0)
    assert proj._apply_signs(torch.ones(1, 3), o - 1)[0].tolist() == expected.tolist()


def test_block_srht_with_blocks_longer_than_a_hash_chunk_equals_its_definition():
    """Two blocks of 2^17 coordinates, the second holding 70,000 (hashed in two 2^16 chunks from an offset),
    assembled here from numpy signs, the orthonormal FWHT (checked against scipy's Hadamard above) and the sampled
    positions."""
    k, p, d = 1 << 17, 32, (1 << 17) + 70_000
    proj = SRHTProjector(d, p, seed=6, block_log2=17)
    assert (proj.block, proj.num_blocks) == (k, 2)
    x = torch.randn(2, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    signs = np.where(coordinate_hash(6, 1, 0, d).numpy() < 0, -1.0, 1.0)
    signed = np.zeros((2, 2 * k))
    signed[:, :d] = x.numpy() * signs
    expected = np.zeros((2, p))
    for j in range(2):
        block = fwht(torch.from_numpy(signed[:, j * k : (j + 1) * k])).numpy()
        expected += np.sqrt(k / p) * block[:, proj.sample_index(j).numpy()]
    np.testing.assert_allclose(proj.project(x).double().numpy(), expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("make", [
    lambda: CountSketchProjector(100, 8, seed=1),
    lambda: SRHTProjector(100, 8, seed=1),
    lambda: RademacherProjector(100, 8, seed=1),
], ids=["countsketch", "srht", "rademacher"])
def test_pieces_equal_the_concatenation_and_mismatched_pieces_are_refused_with_their_shapes(make):
    proj = make()
    gen = torch.Generator().manual_seed(0)
    pieces = [torch.randn(2, n, generator=gen) for n in (40, 60)]
    whole = proj.project(torch.cat(pieces, dim=1))
    torch.testing.assert_close(proj.project_pieces(pieces), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.project_pieces([torch.cat(pieces, dim=1)]), whole, rtol=1e-5, atol=1e-5)
    name = type(proj).__name__
    with pytest.raises(ConfigError, match=name + r"\.project_pieces expects .* summing to 100; got \[\(2, 40\), \(3, 60\)\]"):
        proj.project_pieces([pieces[0], torch.randn(3, 60)])  # right total, rows differ
    with pytest.raises(ConfigError, match=name + r"\.project expects \(B, 100\); got \(2, 99\)"):
        proj.project(torch.zeros(2, 99))


def test_rademacher_matrix_is_the_seeds_int8_draws_in_row_order_whatever_the_chunk():
    gen = torch.Generator().manual_seed(0)
    expected = (torch.randint(0, 2, (2000, 8), generator=gen, dtype=torch.int8).float() * 2 - 1) / np.sqrt(8)
    assert torch.equal(RademacherProjector(2000, 8).matrix(), expected)
    assert torch.equal(RademacherProjector(2000, 8, chunk=300).matrix(), expected)  # chunk bounds memory only
    one_row = RademacherProjector(3, 2, seed=4, chunk=1)  # the smallest chunk is allowed
    gen = torch.Generator().manual_seed(4)
    expected = torch.cat([torch.randint(0, 2, (1, 2), generator=gen, dtype=torch.int8) for _ in range(3)])
    assert torch.equal(one_row.matrix(), (expected.float() * 2 - 1) / np.sqrt(2))
    with pytest.raises(ConfigError, match=r"RademacherProjector\.chunk must be >= 1"):
        RademacherProjector(3, 2, chunk=0)
    with pytest.raises(ConfigError, match=r"RademacherProjector\.out_dim must be >= 1"):
        RademacherProjector(3, 0)


def test_rademacher_keeps_its_matrix_exactly_when_it_fits_the_entry_limit():
    assert RademacherProjector(10, 4, cache_limit=40)._matrix is not None
    assert RademacherProjector(10, 4, cache_limit=39)._matrix is None
    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(RademacherProjector(10, 4, cache_limit=39).project(x),
                               RademacherProjector(10, 4, cache_limit=40).project(x), rtol=1e-6, atol=1e-6)


def test_splitmix64_matches_the_reference_generators_published_outputs():
    """SplitMix64 (Steele, Lea & Flood 2014; Vigna's reference C) seeded 1234567: its first five outputs, each
    the finaliser applied to the seed plus k golden-ratio increments."""
    golden = 0x9E3779B97F4A7C15
    outputs = [projection._splitmix64((1234567 + k * golden) & projection._U64) for k in range(5)]
    assert outputs == [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
                       16408922859458223821]


@pytest.mark.parametrize("in_dim, out_dim, seed, first", [
    (5000, 64, 3, [91, 109, 439, 490, 556, 801]),  # a few of a large block: distinct uniform draws
    (128, 64, 3, [1, 3, 5, 8, 9, 10]),  # 2P = K: still the draw branch
    (100, 50, 3, [1, 3, 5, 8, 14, 18]),  # K = 128: 2P < K < 3P
    (100, 100, 3, [0, 3, 4, 5, 6, 7]),  # 2P > K: a permutation of the block
    (6, 3, 0, [4, 6, 7]),  # the 6 draws from K = 8 hold exactly P = 3 distinct values: kept, not drawn again
])
def test_srht_sampled_positions_are_pinned_per_seed(in_dim, out_dim, seed, first):
    """The sketch is a fixed map per (in_dim, out_dim, seed) revision: gradients stored by one version are
    compared with targets sketched by the next, so a change here (a new seed derivation, a torch whose
    generator draws differently) must bump ``PROJECTION_REVISION`` and update these values."""
    sample = SRHTProjector(in_dim, out_dim, seed=seed).sample_index(0)
    assert sample[:6].tolist() == first
    assert len(set(sample.tolist())) == out_dim and int(sample.max()) < SRHTProjector(in_dim, out_dim).block


@pytest.mark.parametrize("in_dim, out_dim, block_log2, block", [
    (1, 1, 20, 1), (5, 2, 20, 8), (9, 1, 0, 1), (1000, 256, 4, 256), (1000, 257, 4, 512), (1000, 300, 4, 512),
])
def test_srht_block_is_the_next_power_of_two_capped_by_block_log2_unless_out_dim_needs_more(
    in_dim, out_dim, block_log2, block
):
    proj = SRHTProjector(in_dim, out_dim, block_log2=block_log2)
    assert proj.block == block
    assert proj.num_blocks == -(-in_dim // block) and proj.n_pad == proj.num_blocks * block


def test_coordinate_hash_of_an_empty_range_is_an_empty_int32_tensor():
    empty = coordinate_hash(3, 0, 17, 17)
    assert empty.dtype == torch.int32 and empty.shape == (0,)


@pytest.mark.parametrize("cls", [CountSketchProjector, SRHTProjector, RademacherProjector])
def test_the_default_seed_is_zero(cls):
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cls(300, 16).project(x), cls(300, 16, seed=0).project(x))
    assert not torch.equal(cls(300, 16).project(x), cls(300, 16, seed=1).project(x))


def test_countsketch_hashes_a_later_piece_longer_than_a_hash_chunk_as_the_cache_does():
    gen = torch.Generator().manual_seed(5)
    pieces = [torch.randn(2, n, generator=gen) for n in (10, 70_000)]  # the second starts at 10, spans 2 chunks
    hashed = CountSketchProjector(70_010, 64, seed=2, cache_bytes=0).project_pieces(pieces)
    assert torch.equal(hashed, CountSketchProjector(70_010, 64, seed=2).project_pieces(pieces))


@pytest.mark.parametrize("cls", [CountSketchProjector, SRHTProjector, RademacherProjector])
def test_bad_dimensions_name_the_projector_and_the_field(cls):
    name = cls.__name__
    assert (cls(1, 1).in_dim, cls(1, 1).out_dim) == (1, 1)  # the smallest sizes are allowed
    with pytest.raises(ConfigError, match=rf"^{name}\.in_dim must be >= 1; got 0$"):
        cls(0, 4)
    with pytest.raises(ConfigError, match=rf"^{name}\.out_dim must be >= 1; got 0$"):
        cls(4, 0)


@pytest.mark.parametrize("value", [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5, 0x85EBCA6B])
def test_int32_is_the_signed_32_bit_value_with_the_same_low_bits(value):
    got = projection._int32(value)
    assert -(2**31) <= got < 2**31 and (got - value) % 2**32 == 0
