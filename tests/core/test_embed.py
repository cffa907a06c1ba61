"""JVP embeddings: exact directional derivatives, batch-invariant, seeded, shared tangents."""

import numpy as np
import pytest
import torch
import transformers

from idistill_core.data.batch import collate
from idistill_core.errors import ConfigError, ModelError
from idistill_core.models.architecture import truncated_forward
from idistill_core.steps.embed import EmbedConfig, JvpEmbedder, draw_tangents, embed_samples, jvp_parameters
from idistill_core.steps.projection import RademacherProjector

LENGTHS = [5, 9, 3, 7]


def _tiny(dtype=torch.float64, attn="sdpa"):
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


def _examples():
    gen = torch.Generator().manual_seed(3)
    return [
        {
            "sample_id": f"s{i}",
            "input_ids": torch.randint(1, 64, (n,), generator=gen).tolist(),
            "labels": [-100] * n,
        }
        for i, n in enumerate(LENGTHS)
    ]


def _embed_all(model, config, batch_size):
    ex = _examples()
    batches = [collate(ex[i : i + batch_size], pad_token_id=0) for i in range(0, len(ex), batch_size)]
    ids, embs = [], []
    for sample_ids, emb in embed_samples(model, batches, config):
        ids += sample_ids
        embs.append(emb)
    return ids, np.concatenate(embs)


def _raw_and_tangents(model, num_blocks, seed):
    config = EmbedConfig(hidden="none", num_blocks=num_blocks, num_tangents=2, proj_dim=None, dtype="float64", seed=seed)
    batch = collate(_examples(), pad_token_id=0)
    embedder = JvpEmbedder(model, config)
    with embedder.session():
        raw = embedder.raw(batch)  # (B, m, H)
    params = jvp_parameters(model, num_blocks)
    return batch, raw, params, draw_tangents(params, 2, seed=seed)


def test_jvp_equals_central_finite_difference_along_the_same_tangent():
    model = _tiny()
    batch, raw, params, tangents = _raw_and_tangents(model, 2, seed=5)
    rows, last = torch.arange(len(batch)), batch.last_token_index()
    # HF's RMSNorm and eager softmax compute in float32 even for a float64 model, so the forward has
    # ~1e-7 relative round-off; eps = 1e-4 balances it against the O(eps^2) truncation error.
    eps = 1e-4
    for i in range(2):
        outs = []
        for sign in (1, -1):
            with torch.no_grad():
                for name, p in params.items():
                    p.add_(sign * eps * tangents[name][i])
                outs.append(truncated_forward(model, batch.input_ids, batch.attention_mask, 2)[rows, last])
                for name, p in params.items():
                    p.sub_(sign * eps * tangents[name][i])
        fd = (outs[0] - outs[1]) / (2 * eps)
        scale = fd.abs().max()
        assert scale > 1.0  # a meaningful, non-zero derivative
        assert (raw[:, i] - fd).abs().max() < 3e-4 * scale
        # A wrong tangent (the other one) is far off, so the tolerance above is discriminating.
        assert (raw[:, 1 - i] - fd).abs().max() > 0.1 * scale


def test_jvp_matches_reverse_mode_adjoint_identity():
    """<u, J v> from forward mode equals <J^T u, v> from plain backward, for every tangent."""
    model = _tiny()
    batch, raw, params, tangents = _raw_and_tangents(model, 2, seed=5)
    rows, last = torch.arange(len(batch)), batch.last_token_index()
    u = torch.randn(raw[:, 0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = truncated_forward(model, batch.input_ids, batch.attention_mask, 2)[rows, last]
    grads = torch.autograd.grad((out * u).sum(), list(params.values()))
    for i in range(2):
        adjoint = sum((g * tangents[name][i]).sum() for g, name in zip(grads, params))
        forward = (raw[:, i] * u).sum()
        # Both linearise the same float32-internal ops (see above), so agreement is to ~1e-6.
        torch.testing.assert_close(forward, adjoint, rtol=1e-5, atol=0)
        other = (raw[:, 1 - i] * u).sum()
        assert abs(other - adjoint) > 1e-2 * abs(adjoint)


def test_batched_equals_one_at_a_time_float64():
    model = _tiny()
    config = EmbedConfig(hidden="none", num_blocks=2, proj_dim=16, dtype="float64", batch_size=4)
    ids_batched, batched = _embed_all(model, config, batch_size=4)
    ids_single, single = _embed_all(model, config, batch_size=1)
    assert ids_batched == ids_single == [f"s{i}" for i in range(len(LENGTHS))]
    assert batched.shape == (4, 16) and batched.dtype == np.float32
    # HF's softmax and RMSNorm run in float32 even in a float64 model, so padding (a longer softmax
    # row) moves results at the float32 round-off level, not 1e-10.
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5 * np.abs(single).max())


def test_batched_equals_one_at_a_time_float32_and_loop_over_tangents():
    model = _tiny(torch.float32)
    config = EmbedConfig(hidden="none", num_blocks=3, proj_dim=None, batch_size=4)
    _, batched = _embed_all(model, config, batch_size=4)
    _, single = _embed_all(model, config, batch_size=1)
    _, looped = _embed_all(model, EmbedConfig(hidden="none", num_blocks=3, proj_dim=None, vmap_tangents=False), 4)
    scale = np.abs(single).max()
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(looped, batched, rtol=0, atol=1e-5 * scale)


def test_projection_is_rademacher_of_concatenated_tangents():
    model = _tiny()
    raw_cfg = EmbedConfig(hidden="none", num_blocks=2, proj_dim=None, dtype="float64", seed=9)
    proj_cfg = EmbedConfig(hidden="none", num_blocks=2, proj_dim=24, dtype="float64", seed=9)
    _, raw = _embed_all(model, raw_cfg, 4)
    _, projected = _embed_all(model, proj_cfg, 4)
    assert raw.shape == (4, 2 * 32)
    r = RademacherProjector(64, 24, seed=9).matrix().numpy()
    np.testing.assert_allclose(projected, raw @ r, rtol=1e-5, atol=1e-6)


def test_embeddings_are_deterministic_per_seed_and_tangents_are_shared_across_batches():
    model = _tiny()
    config = EmbedConfig(hidden="none", num_blocks=2, proj_dim=16, dtype="float64", seed=1)
    _, a = _embed_all(model, config, 2)
    _, b = _embed_all(model, config, 2)
    _, other = _embed_all(model, EmbedConfig(hidden="none", num_blocks=2, proj_dim=16, dtype="float64", seed=2), 2)
    np.testing.assert_array_equal(a, b)  # bitwise: same process, same batches and shapes, same kernels
    assert np.abs(a - other).max() > 1e-3
    # A sample's embedding does not depend on which batch (hence which pass) it came in.
    ex = _examples()
    ((_ids, late),) = embed_samples(model, [collate([ex[3], ex[0]], pad_token_id=0)], config)
    tol = 1e-5 * np.abs(a).max()
    np.testing.assert_allclose(late[0], a[3], rtol=0, atol=tol)
    np.testing.assert_allclose(late[1], a[0], rtol=0, atol=tol)


def test_model_is_left_as_it_was():
    model = _tiny(attn="sdpa")
    model.train()
    before = {n: p.clone() for n, p in model.named_parameters()}
    _embed_all(model, EmbedConfig(hidden="none", num_blocks=1, proj_dim=8, dtype="float64"), 4)
    assert model.config._attn_implementation == "sdpa"
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_invalid_config_and_model_are_rejected():
    with pytest.raises(ConfigError, match="EmbedConfig.num_blocks"):
        EmbedConfig(num_blocks=0)
    with pytest.raises(ConfigError, match="EmbedConfig.dtype"):
        EmbedConfig(dtype="float16x")
    with pytest.raises(ModelError, match="num_blocks"):
        list(embed_samples(_tiny(), [collate(_examples(), 0)], EmbedConfig(num_blocks=4)))
    assert EmbedConfig().fingerprint() != EmbedConfig(seed=1).fingerprint()


def test_default_embedding_is_the_unit_jvp_beside_the_unit_weighted_mean_final_hidden_state():
    """``hidden='final'``: ``[e/‖e‖ ; r]`` with ``r`` the position-weighted (j+1) mean of the final-normed last
    hidden states at unit norm, checked against a one-sample-at-a-time loop over HF's own hidden states."""
    model = _tiny()
    jvp_only = EmbedConfig(hidden="none", num_blocks=2, proj_dim=16, dtype="float64", batch_size=4)
    both = EmbedConfig(num_blocks=2, proj_dim=16, dtype="float64", batch_size=4)
    assert both.hidden == "final" and both.output_dim(32) == 16 + 32
    _, e = _embed_all(model, jvp_only, batch_size=4)
    _, got = _embed_all(model, both, batch_size=4)  # padded batches: padding must not move the feature
    assert got.shape == (4, 48)
    np.testing.assert_allclose(got[:, :16], e / np.linalg.norm(e, axis=1, keepdims=True), atol=1e-5)
    for row, ex in zip(got, _examples(), strict=True):
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ex["input_ids"]]), output_hidden_states=True).hidden_states[-1][0]
        w = torch.arange(1, h.shape[0] + 1, dtype=h.dtype)
        r = (w[:, None] * h).sum(0) / w.sum()
        np.testing.assert_allclose(row[16:], (r / r.norm()).numpy(), atol=1e-5)
    assert not np.allclose(got[:, 16:], got[0, 16:])  # the samples differ (a constant feature would pass the norm)


def test_hidden_must_be_final_or_none():
    with pytest.raises(ConfigError, match="EmbedConfig.hidden"):
        EmbedConfig(hidden="last")
