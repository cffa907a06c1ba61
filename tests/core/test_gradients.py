"""Per-sample gradients: vmap == loop == plain autograd, and the reduction pipeline does what it says."""

import math
from types import SimpleNamespace

import pytest
import torch

from idistill_core.data.batch import collate
from idistill_core.errors import ConfigError, NumericalError
from idistill_core.steps.gradients import (
    GradientConfig,
    collect_gradients,
    coordinate_masks,
    flat_gradients,
    iter_gradients,
    select_parameters,
)
from idistill_core.steps.projection import CountSketchProjector, RademacherProjector, SRHTProjector
from tests.conftest import tiny_llama

LENGTHS = [6, 9, 4, 7]


def _tiny(dtype=torch.float64):
    return tiny_llama(0).to(dtype)


def _examples():
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(1, 64, (n,), generator=gen).tolist()
        out.append({"sample_id": f"s{i}", "input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def _reference(model, examples, names):
    """One sample at a time, unpadded, HF's own loss, plain ``torch.autograd.grad``."""
    params = dict(model.named_parameters())
    rows = []
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        loss = model(input_ids=ids, labels=torch.tensor([ex["labels"]])).loss
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_vmap_and_loop_equal_plain_autograd_per_sample():
    model = _tiny()
    names = select_parameters(model, "down_proj")
    batch = collate(_examples(), pad_token_id=0)
    ref = _reference(model, _examples(), names)
    loop = flat_gradients(model, batch, names, batch_size=1)
    vmapped = flat_gradients(model, batch, names, batch_size=3)  # chunks of 3 + 1 rows
    assert loop.shape == (4, 2 * 32 * 64)
    scale = ref.abs().max()
    assert scale > 1e-3
    # HF computes RMSNorm/softmax internals in float32 even in float64, hence 1e-6 not 1e-12.
    torch.testing.assert_close(loop, ref, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(vmapped, ref, rtol=0, atol=1e-6 * scale)
    # The rows differ from each other, so a broadcast/batch-mixing bug would be caught.
    assert (ref[0] - ref[1]).abs().max() > 0.1 * scale


def test_pipeline_is_mask_then_precondition_then_normalise_then_project():
    model = _tiny()
    names = select_parameters(model, r"layers\.1\..*(down|up)_proj")
    assert names == ["model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(5)
    a = {n: torch.rand(params[n].shape, generator=gen, dtype=torch.float64) + 0.5 for n in names}
    config = GradientConfig(
        param_subset=r"layers\.1\..*(down|up)_proj", max_params=1000, proj_type="srht", proj_dim=128, seed=3
    )
    got = collect_gradients(
        model, [collate(_examples(), pad_token_id=0)], config, preconditioner=SimpleNamespace(a=a)
    )

    masks = coordinate_masks(model, names, 1000, seed=3)
    raw = _reference(model, _examples(), names)
    flat_a = torch.cat([v.reshape(-1) for v in a.values()])
    keep = torch.cat([masks[names[0]], masks[names[1]] + params[names[0]].numel()])
    expected = raw[:, keep] * flat_a[keep]
    expected = expected / expected.norm(dim=1, keepdim=True)
    expected = SRHTProjector(len(keep), 128, seed=3).project(expected)
    assert got.sample_ids == ["s0", "s1", "s2", "s3"]
    assert got.grads.dtype == torch.float32 and got.grads.shape == (4, 128)
    torch.testing.assert_close(got.grads, expected, rtol=0, atol=1e-4)


def test_countsketch_option_sketches_each_tensor_as_the_concatenated_preconditioned_unit_gradient():
    model = _tiny()
    subset = r"layers\..*down_proj"  # two tensors: the sketch is taken per tensor, never concatenated
    names = select_parameters(model, subset)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(5)
    a = {n: torch.rand(params[n].shape, generator=gen, dtype=torch.float64) + 0.5 for n in names}
    config = GradientConfig(param_subset=subset, proj_type="countsketch", proj_dim=64, seed=3)
    got = collect_gradients(
        model, [collate(_examples(), pad_token_id=0)], config, preconditioner=SimpleNamespace(a=a)
    )
    # Independent reference in float64: plain autograd gradients, ⊙a, unit norm, then the dense S matrix.
    flat = _reference(model, _examples(), names) * torch.cat([a[n].reshape(-1) for n in names])
    flat = flat / flat.norm(dim=1, keepdim=True)
    proj = CountSketchProjector(flat.shape[1], 64, seed=3)
    dense = torch.zeros(64, flat.shape[1], dtype=torch.float64)
    buckets, signs = proj.buckets_and_signs()
    dense[buckets, torch.arange(flat.shape[1])] = signs.double()
    expected = flat @ dense.T
    # float64 gradients, float32 sketch of a unit vector: rounding is a few float32 eps per bucket sum.
    torch.testing.assert_close(got.grads.double(), expected, rtol=0, atol=64 * torch.finfo(torch.float32).eps)
    assert (got.grads.norm(dim=1) - 1).abs().max() < 0.5  # a JL sketch of unit vectors, not a rescaling bug


def test_gradients_are_unit_norm_and_rademacher_option_projects():
    model = _tiny()
    batches = [collate(_examples()[:2], 0), collate(_examples()[2:], 0)]
    raw = collect_gradients(model, batches, GradientConfig(proj_dim=None))
    torch.testing.assert_close(raw.grads.norm(dim=1), torch.ones(4), rtol=1e-5, atol=0)
    rad = collect_gradients(model, batches, GradientConfig(proj_type="rademacher", proj_dim=64, seed=2))
    expected = RademacherProjector(raw.grads.shape[1], 64, seed=2).project(raw.grads)
    torch.testing.assert_close(rad.grads, expected, rtol=0, atol=1e-5)


def test_coordinate_mask_is_proportional_seeded_and_shared():
    model = _tiny()
    names = select_parameters(model, "proj")
    sizes = {n: p.numel() for n, p in model.named_parameters() if n in names}
    total = sum(sizes.values())
    masks = coordinate_masks(model, names, 3000, seed=1)
    for n in names:
        assert len(masks[n]) == round(3000 * sizes[n] / total)
        assert torch.equal(masks[n], masks[n].unique())  # sorted, no repeats
    again = coordinate_masks(model, names, 3000, seed=1)
    other = coordinate_masks(model, names, 3000, seed=2)
    assert all(torch.equal(masks[n], again[n]) for n in names)
    assert not all(torch.equal(masks[n], other[n]) for n in names)
    assert all(m is None for m in coordinate_masks(model, names, total, seed=1).values())


def test_model_flags_and_weights_are_restored():
    model = _tiny()
    model.train()
    model.lm_head.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    list(iter_gradients(model, [collate(_examples(), 0)], GradientConfig(proj_dim=None, batch_size=2)))
    assert model.training
    assert not model.lm_head.weight.requires_grad
    assert model.model.layers[0].mlp.down_proj.weight.requires_grad
    assert model.config._attn_implementation == "sdpa"
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None


def test_sample_without_supervised_token_is_named():
    model = _tiny()
    ex = _examples()
    ex[2]["labels"] = [-100] * LENGTHS[2]
    with pytest.raises(NumericalError, match="sample 's2': no supervised token"):
        list(iter_gradients(model, [collate(ex, 0)], GradientConfig(proj_dim=None)))


def test_non_finite_gradient_is_named():
    model = _tiny()
    with torch.no_grad():
        model.model.embed_tokens.weight[_examples()[1]["input_ids"][0]] = math.nan
    with pytest.raises(NumericalError, match="sample 's1': non-finite gradient"):
        list(iter_gradients(model, [collate(_examples(), 0)], GradientConfig(proj_dim=None)))


def test_parameter_subsets_and_bad_configs():
    model = _tiny()
    assert len(select_parameters(model, "all")) == len(list(model.parameters()))
    assert select_parameters(model, "o_proj") == [f"model.layers.{i}.self_attn.o_proj.weight" for i in (0, 1)]
    with pytest.raises(ConfigError, match="'nothing_here' matches no parameter of LlamaForCausalLM"):
        select_parameters(model, "nothing_here")
    with pytest.raises(ConfigError, match="GradientConfig.param_subset"):
        GradientConfig(param_subset="(")
    with pytest.raises(ConfigError, match="GradientConfig.proj_type"):
        GradientConfig(proj_type="had")
    with pytest.raises(ConfigError, match="preconditioner has no factor"):
        list(iter_gradients(model, [collate(_examples(), 0)], preconditioner=SimpleNamespace(a={})))
