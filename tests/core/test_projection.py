"""Projections: the WHT is the orthonormal Hadamard matrix, and the JL projectors keep geometry; inputs are
chosen to defeat broken maps (constant vectors and Hadamard rows need the random signs, one-hots the hashing)."""

import dataclasses
import math

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
    make_projector,
)


@pytest.mark.parametrize("n", [1, 2, 8, 256, 1024])
def test_fwht_equals_dense_orthonormal_hadamard(n):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    dense = torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64)) / math.sqrt(n)
    torch.testing.assert_close(fwht(x), x @ dense.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [2**9, 2**16])  # 2, 3 passes: every scratch buffer is written at least once
def test_fwht_leaves_its_input_alone_unless_told_and_gives_the_same_transform_either_way(n):
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    kept = x.clone()
    y = fwht(x)
    torch.testing.assert_close(x, kept, rtol=0, atol=0)
    scratch = x.clone()
    torch.testing.assert_close(fwht(scratch, overwrite=True), y, rtol=0, atol=0)
    torch.testing.assert_close(fwht(fwht(x.T.contiguous().T)), x, rtol=0, atol=1e-12)  # a strided input


def test_fwht_is_orthonormal_and_self_inverse():
    n = 512  # more than one 128-point factor, so the Kronecker passes are exercised
    eye = torch.eye(n, dtype=torch.float64)
    h = fwht(eye)
    torch.testing.assert_close(h @ h.T, eye, rtol=0, atol=1e-12)
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fwht(fwht(x)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(fwht(x).norm(dim=1), x.norm(dim=1), rtol=1e-12, atol=0)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ConfigError, match="power-of-two"):
        fwht(torch.zeros(2, 12))


def _dense_srht(proj: SRHTProjector) -> torch.Tensor:
    """``(out_dim, in_dim)`` float64 matrix ``sum_j sqrt(K/P) S_j H_K D_j`` from the map's own signs and samples."""
    k = proj.block
    h = torch.from_numpy(scipy.linalg.hadamard(k).astype(np.float64)) / math.sqrt(k)
    blocks = []
    for j in range(proj.num_blocks):
        signs = proj.signs(j * k, (j + 1) * k).double()
        blocks.append((h * signs)[proj.sample_index(j)] * math.sqrt(k / proj.out_dim))
    return torch.cat(blocks, dim=1)[:, : proj.in_dim]


def test_srht_equals_its_dense_definition():
    proj = SRHTProjector(in_dim=100, out_dim=16, seed=5)
    assert proj.n_pad == 128 and proj.num_blocks == 1
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(proj.project(x).double(), x.double() @ _dense_srht(proj).T, rtol=1e-5, atol=1e-5)


def test_block_srht_equals_its_dense_definition_and_blocks_draw_their_own_samples():
    proj = SRHTProjector(in_dim=700, out_dim=64, seed=5, block_log2=8)  # 3 blocks of 256, the last padded
    assert (proj.block, proj.num_blocks, proj.n_pad) == (256, 3, 768)
    samples = [proj.sample_index(j) for j in range(3)]
    assert all(len(set(s.tolist())) == 64 and int(s.max()) < 256 for s in samples)  # distinct, in the block
    assert not torch.equal(samples[0], samples[1])
    x = torch.randn(3, 700, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(proj.project(x).double(), x.double() @ _dense_srht(proj).T, rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(1)
    pieces = [torch.randn(2, n, generator=gen) for n in (100, 300, 1, 299)]  # pieces straddle the blocks
    scale = torch.tensor([[0.5], [2.0]])
    torch.testing.assert_close(
        proj.project_pieces(pieces, scale), proj.project(torch.cat(pieces, dim=1)) * scale, rtol=1e-5, atol=1e-5
    )


def test_srht_with_all_coordinates_is_an_isometry():
    proj = SRHTProjector(in_dim=64, out_dim=64, seed=0)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(proj.project(x) @ proj.project(x).T, x @ x.T, rtol=1e-4, atol=1e-4)


def _unit_vectors(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).float()


@pytest.mark.parametrize(
    "make",
    [
        lambda: SRHTProjector(3000, 1024, seed=7),
        lambda: SRHTProjector(3000, 1024, seed=7, block_log2=10),  # 3 blocks
        lambda: RademacherProjector(3000, 1024, seed=7),
        lambda: CountSketchProjector(3000, 1024, seed=7),
    ],
    ids=["srht", "block-srht", "rademacher", "countsketch"],
)
def test_projectors_keep_inner_products_within_jl_tolerance(make):
    proj = make()
    x = _unit_vectors(40, 3000, seed=11)
    exact = x @ x.T
    approx = proj.project(x) @ proj.project(x).T
    # Each projected inner product of unit vectors has standard deviation <= sqrt(2/k); over 820
    # pairs, 6 standard deviations is never reached by chance and a wrong scale fails it.
    tol = 6 * math.sqrt(2 / proj.out_dim)
    err = (approx - exact).abs()
    assert err.max() < tol
    # Mean squared norm must be unbiased: the average over 40 vectors is within 4 sd of 1.
    sq = approx.diagonal()
    assert abs(sq.mean().item() - 1) < 4 * math.sqrt(2 / proj.out_dim) / math.sqrt(40)
    # And the errors are not all zero (an identity "projection" would not reduce dimension).
    assert err.max() > 1e-3


def test_rademacher_chunked_path_equals_resident_matrix():
    resident = RademacherProjector(500, 64, seed=3, chunk=128)
    streamed = RademacherProjector(500, 64, seed=3, chunk=128, cache_limit=0)
    assert streamed._matrix is None
    m = resident.matrix()
    assert set(torch.unique(m * 8).tolist()) == {-1.0, 1.0}
    x = torch.randn(4, 500, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(streamed.project(x), x @ m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resident.project(x), x @ m, rtol=1e-5, atol=1e-5)


def test_projectors_are_deterministic_per_seed():
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    for cls in (SRHTProjector, RademacherProjector, CountSketchProjector):
        a = cls(300, 32, seed=1).project(x)
        b = cls(300, 32, seed=1).project(x)
        c = cls(300, 32, seed=2).project(x)
        assert torch.equal(a, b)  # bitwise: same input, shapes and process, so the same kernels
        assert not torch.allclose(a, c)
        assert a.dtype == torch.float32 and a.shape == (2, 32)


def test_bad_dimensions_raise_config_errors():
    with pytest.raises(ConfigError, match="out_dim"):
        SRHTProjector(100, 200, seed=0)
    with pytest.raises(ConfigError, match="in_dim"):
        RademacherProjector(0, 8)
    with pytest.raises(ConfigError, match=r"\(B, 10\)"):
        SRHTProjector(10, 4).project(torch.zeros(2, 11))


# --- CountSketch -------------------------------------------------------------------------------------------


def _dense_countsketch(proj: CountSketchProjector) -> torch.Tensor:
    """``(out_dim, in_dim)`` float64 matrix with ``S[h(i), i] = s_i``, built from the map's own tables."""
    buckets, signs = proj.buckets_and_signs()
    dense = torch.zeros(proj.out_dim, proj.in_dim, dtype=torch.float64)
    dense[buckets, torch.arange(proj.in_dim)] = signs.double()
    return dense


def test_countsketch_equals_its_dense_definition_and_draws_real_hashes():
    proj = CountSketchProjector(in_dim=1000, out_dim=32, seed=4)
    buckets, signs = proj.buckets_and_signs()
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert buckets.unique().numel() == 32  # every bucket used; 1000 draws over 32 buckets
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    ref = x.double() @ _dense_countsketch(proj).T
    # float32 sums of ~31 terms per bucket: a few eps of the absolute sum bounds the rounding.
    tol = 8 * torch.finfo(torch.float32).eps * x.abs().sum(dim=1).max().item()
    torch.testing.assert_close(proj.project(x).double(), ref, rtol=0, atol=tol)


def test_countsketch_keeps_every_one_hot_norm_exactly():
    proj = CountSketchProjector(in_dim=300, out_dim=16, seed=2)
    out = proj.project(torch.eye(300))
    assert torch.equal(out.abs().sum(dim=1), torch.ones(300))  # exactly one ±1 per row, nothing else
    assert torch.equal(out.norm(dim=1), torch.ones(300))
    buckets, signs = proj.buckets_and_signs()
    assert torch.equal(out.argmax(dim=1).where(out.max(dim=1).values > 0, out.argmin(dim=1)), buckets)
    assert torch.equal(out.sum(dim=1), signs)


def test_countsketch_pieces_equal_the_concatenated_input():
    proj = CountSketchProjector(in_dim=700, out_dim=64, seed=3)
    gen = torch.Generator().manual_seed(1)
    pieces = [torch.randn(2, n, generator=gen) for n in (100, 1, 599)]
    scale = torch.tensor([[0.5], [2.0]])
    whole = proj.project(torch.cat(pieces, dim=1)) * scale
    tol = 8 * torch.finfo(torch.float32).eps * torch.cat(pieces, dim=1).abs().sum().item()
    torch.testing.assert_close(proj.project_pieces(pieces, scale), whole, rtol=0, atol=tol)
    with pytest.raises(ConfigError, match="pieces summing to 700"):
        proj.project_pieces(pieces[:2])


def _norm_ratios(proj, x):
    return (proj.project(x).norm(dim=1) ** 2 / x.norm(dim=1) ** 2).tolist()


# A constant vector and Hadamard rows are where the random signs do all the work: with all signs +1, a
# CountSketch sums a constant vector's d/P equal entries per bucket (|Sx|^2 = d/P |x|^2), and the SRHT
# maps a Hadamard row to one spike (|Sx|^2 = 0 or n/P |x|^2). With signs, |Sx|^2/|x|^2 has sd ~ sqrt(2/P)
# = 0.09 for P = 256, so [0.5, 1.5] is a > 5 sd band.
def _hadamard_rows(n: int, rows: list[int]) -> torch.Tensor:
    return torch.from_numpy(scipy.linalg.hadamard(n)[rows].astype(np.float32))


def _break_signs(proj):
    """The same map with every sign +1: CountSketch codes folded onto [0, P), SRHT's sign flips skipped."""
    if isinstance(proj, CountSketchProjector):
        codes = proj._to_codes
        proj._to_codes = lambda h: codes(h) % proj.out_dim
    else:
        proj._apply_signs = lambda view, start, htmp=None: view


def _check_sign_sensitive_inputs(make, broken_signs: bool):
    ratios = []
    for seed in range(3):
        proj = make(seed)
        if broken_signs:
            _break_signs(proj)
        ratios += _norm_ratios(proj, torch.ones(1, 4096))
        ratios += _norm_ratios(proj, _hadamard_rows(4096, [1, 77, 2048, 4095]))
    return all(0.5 < r < 1.5 for r in ratios), ratios


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: CountSketchProjector(4096, 256, seed=seed),
        lambda seed: SRHTProjector(4096, 256, seed=seed),
        lambda seed: SRHTProjector(4096, 256, seed=seed, block_log2=10),
    ],
    ids=["countsketch", "srht", "block-srht"],
)
def test_random_signs_spread_constant_vectors_and_hadamard_rows(make):
    ok, ratios = _check_sign_sensitive_inputs(make, broken_signs=False)
    assert ok, ratios
    # The same check must catch a map whose signs are all +1 (so it would catch a sign bug).
    broken_ok, _ = _check_sign_sensitive_inputs(make, broken_signs=True)
    assert not broken_ok


def test_countsketch_inner_products_are_unbiased_with_the_theoretical_variance():
    d, p, seeds = 64, 16, 3000
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    y = 0.6 * x + torch.randn(d, generator=gen, dtype=torch.float64)
    x[0], y[0] = 6.0, 5.0  # a heavy shared coordinate makes the -2 sum x_i^2 y_i^2 term large
    ip = float(x @ y)
    theory = (float(x @ x) * float(y @ y) + ip**2 - 2 * float((x**2 * y**2).sum())) / p
    dense_jl = (float(x @ x) * float(y @ y) + ip**2) / p  # what a dense Gaussian/Rademacher map gives
    xy = torch.stack([x, y]).float()
    sketches = [CountSketchProjector(d, p, seed=s).project(xy).double() for s in range(seeds)]
    est = torch.tensor([float(out[0] @ out[1]) for out in sketches], dtype=torch.float64)
    mean, var = est.mean().item(), est.var().item()
    assert abs(mean - ip) < 5 * math.sqrt(theory / seeds), (mean, ip)
    # Standard error of the sample variance from the sample's own fourth central moment.
    se_var = math.sqrt(((est - mean) ** 4).mean().item() / seeds - var**2 / seeds)
    assert abs(var - theory) < 5 * se_var, (var, theory, se_var)
    assert abs(var - dense_jl) > 5 * se_var  # the test can tell CountSketch's variance from dense JL's


def test_make_projector_knows_every_name():
    assert isinstance(make_projector("countsketch", 10, 4, 0), CountSketchProjector)
    assert isinstance(make_projector("srht", 10, 4, 0), SRHTProjector)
    with pytest.raises(ConfigError, match="proj_type must be one of srht, rademacher, countsketch"):
        make_projector("gaussian", 10, 4, 0)


# --- no tables: hashed coordinates, state independent of in_dim ----------------------------------------------


def _python_hash(seed: int, stream: int, coordinate: int) -> int:
    """The documented hash in plain Python integers (exact mod-2^32 arithmetic): what any device must give."""
    a, b = projection._salts(seed, stream, coordinate >> 30)
    h = ((a & 0xFFFFFFFF) * (coordinate & (2**30 - 1)) + (b & 0xFFFFFFFF)) & 0xFFFFFFFF
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, 1)):
        h ^= h >> shift
        h = (h * mult) & 0xFFFFFFFF
    return h - 2**32 if h >= 2**31 else h


@pytest.mark.parametrize("start", [0, 65536 - 3, 2**30 - 5, 3 * 2**30 + 7])  # chunk and 2^30-block edges
def test_coordinate_hash_is_the_documented_integer_function(start):
    got = coordinate_hash(11, 0, start, start + 10).tolist()
    assert got == [_python_hash(11, 0, c) for c in range(start, start + 10)]
    assert coordinate_hash(11, 1, start, start + 10).tolist() != got  # streams are independent


def test_projector_state_does_not_grow_with_the_input():
    """7B down_proj (32 x 4096 x 11008 = 1.44B coordinates): no per-coordinate table, so building is instant and
    the state is O(P) per SRHT block actually used (a table would be ~17 GB)."""
    d = 32 * 4096 * 11008
    count = CountSketchProjector(d, 8192, seed=1)
    srht = SRHTProjector(d, 8192, seed=1)
    tensors = [v for p in (count, srht) for v in vars(p).values() if isinstance(v, torch.Tensor)]
    assert tensors == [] and srht.num_blocks == 1376
    srht.sample_index(1375)
    assert sum(t.numel() for t in srht._index.values()) == 8192  # one block's sample, drawn on demand
    # a one-hot at the last coordinate lands in one bucket, with its hashed sign
    bucket, sign = count.buckets_and_signs(d - 1, d)
    assert 0 <= int(bucket) < 8192 and float(sign) in (-1.0, 1.0)


def test_countsketch_cached_codes_equal_hashing_every_call_and_respect_the_budget():
    gen = torch.Generator().manual_seed(2)
    pieces = [torch.randn(3, n, generator=gen) for n in (70_000, 5, 61_000)]  # spans several hash chunks
    cached = CountSketchProjector(131_005, 128, seed=9)
    hashed = CountSketchProjector(131_005, 128, seed=9, cache_bytes=0)
    assert torch.equal(cached.project_pieces(pieces), hashed.project_pieces(pieces))  # same adds, same order
    assert cached.state_bytes() == 8 * 131_005 and hashed.state_bytes() == 0
    cached.project_pieces(pieces)
    assert list(cached._cache) == ["cpu"]  # built once per device, not per call


def test_rademacher_matrix_goes_to_a_device_once():
    proj = RademacherProjector(300, 32, seed=1)
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    proj.project(x)
    cached = proj._on_device["cpu"]
    proj.project(x)
    assert proj._on_device["cpu"] is cached and len(proj._on_device) == 1


def test_gradient_configs_carry_the_sketch_revision_into_their_fingerprint():
    from idistill_core.steps.gradients import GradientConfig

    config = GradientConfig()
    assert config.proj_revision == projection.PROJECTION_REVISION == 2
    assert "proj_revision" in dataclasses.asdict(config)  # so config_fingerprint changes with it
    with pytest.raises(ConfigError, match="proj_revision 1 is not implemented"):
        GradientConfig(proj_revision=1)
