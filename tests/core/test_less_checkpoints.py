"""LESS across checkpoints (issue 25): every checkpoint's Adam and SGD feature against a hand computation from
THAT checkpoint's own LoRA weights and Adam moments, and the end-to-end score against ``max_subtask mean_t
Σ_c η̄_c cos`` with the mean learning rates of HF's linear schedule worked out by hand."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idistill_core.methods.less import adam_features, less_outcome, lora_warmup
from idistill_core.steps.projection import RademacherProjector
from tests.core.conftest import LESS_CFG, less_rows

CFG = LESS_CFG
_rows = less_rows


def _hand_features(warm, checkpoint, row, config):
    """(Adam Γ, SGD g) of one sample, projected and unit-normalised, from a deep copy of the warmed model whose
    LoRA weights are set to ``checkpoint.lora`` here, with ``checkpoint``'s own moments; float64 arithmetic."""
    model = copy.deepcopy(warm.model).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in warm.names:
            params[name].copy_(checkpoint.lora[name])
    logits = model(input_ids=row.input_ids).logits[0, :-1]
    labels = row.labels[0, 1:]
    loss = F.cross_entropy(logits[labels != -100], labels[labels != -100])
    grads = torch.autograd.grad(loss, [params[n] for n in warm.names])
    g = torch.cat([x.reshape(-1) for x in grads]).double()
    m = torch.cat([checkpoint.exp_avg[n].reshape(-1) for n in warm.names]).double()
    v = torch.cat([checkpoint.exp_avg_sq[n].reshape(-1) for n in warm.names]).double()
    b1, b2 = config.betas
    gamma = (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g * g + config.eps)
    proj = RademacherProjector(g.numel(), config.proj_dim, seed=config.seed).matrix().double()
    return F.normalize(gamma @ proj, dim=0), F.normalize(g @ proj, dim=0)


def test_every_checkpoints_feature_uses_that_checkpoints_own_lora_weights_and_moments(tiny, data, warm):
    pool, _ = data
    row = _rows(pool, tiny.tokenizer, 9)[8]
    first, last = warm.checkpoints
    # the checkpoints are snapshots: epoch 1's weights and moments are not the final ones
    a = next(n for n in warm.names if "lora_A" in n)
    assert not torch.equal(first.lora[a], last.lora[a])
    assert not torch.equal(first.exp_avg[a], last.exp_avg[a]) and not torch.equal(first.exp_avg_sq[a], last.exp_avg_sq[a])
    (_, adam), = list(adam_features(warm, [row], CFG))
    (_, sgd), = list(adam_features(warm, [row], CFG, kind="sgd"))
    assert adam.shape == sgd.shape == (1, 2, CFG.proj_dim)
    tol = {"rtol": 1e-4, "atol": 1e-5}
    expected = [_hand_features(warm, c, row, CFG) for c in warm.checkpoints]
    for c, (gamma, g) in enumerate(expected):
        torch.testing.assert_close(adam[0, c].double(), gamma, **tol, msg=f"Adam feature of checkpoint {c + 1}")
        torch.testing.assert_close(sgd[0, c].double(), g, **tol, msg=f"SGD feature of checkpoint {c + 1}")
    # the case tells the mistakes apart: epoch 1 with the last weights, or with the last moments, is far off
    wrong_weights = _hand_features(warm, dataclasses.replace(first, lora=last.lora), row, CFG)
    wrong_moments = _hand_features(
        warm, dataclasses.replace(first, exp_avg=last.exp_avg, exp_avg_sq=last.exp_avg_sq), row, CFG
    )
    assert (wrong_weights[1] - expected[0][1]).abs().max() > 100 * tol["atol"]
    assert (wrong_weights[0] - expected[0][0]).abs().max() > 100 * tol["atol"]
    assert (wrong_moments[0] - expected[0][0]).abs().max() > 100 * tol["atol"]


def _hf_linear_lrs(peak, steps_per_epoch, epochs, warmup_ratio):
    """Per-step learning rates of transformers' get_linear_schedule_with_warmup, written out."""
    total = steps_per_epoch * epochs
    warm = int(np.ceil(warmup_ratio * total))
    return [peak * (s / warm if s < warm else (total - s) / (total - warm)) for s in range(total)]


def test_less_score_is_the_mean_lr_weighted_cosine_summed_over_checkpoints(tiny, data):
    pool, targets = data
    pool, targets = pool.select(range(12)), targets.select(range(4))
    config = dataclasses.replace(CFG, warmup_fraction=0.25, batch_size=1)  # 3 warm-up rows, 3 steps per epoch
    groups = {t: f"task{i % 2}" for i, t in enumerate(targets["sample_id"])}
    outcome = less_outcome(tiny.model, tiny.tokenizer, pool, targets, 4, config, batch_size=4, target_subtasks=groups)

    # the mean lr of each epoch: steps [0, 1, 0.8 | 0.6, 0.4, 0.2] × 1e-3 (one warm-up step of 6)
    lrs = _hf_linear_lrs(config.lr, 3, 2, config.warmup_ratio)
    mean_lrs = [np.mean(lrs[:3]), np.mean(lrs[3:])]
    np.testing.assert_allclose(mean_lrs, [0.6e-3, 0.4e-3], rtol=1e-12)
    np.testing.assert_allclose(outcome.details["checkpoint_weights"], mean_lrs, rtol=1e-12)

    # the same seeded warm-up (rows drawn by default_rng(seed), sorted), features per checkpoint (checked above)
    rows = sorted(np.random.default_rng(config.seed).choice(12, size=3, replace=False).tolist())
    assert outcome.details["warmup_ids"] == [pool["sample_id"][r] for r in rows]
    warm = lora_warmup(tiny.model, [_rows(pool, tiny.tokenizer, 12)[r] for r in rows], config)
    pool_rows = _rows(pool, tiny.tokenizer, 12)
    target_rows = _rows(targets, tiny.tokenizer, 4)
    pool_f = torch.cat([f for _, f in adam_features(warm, pool_rows, config)]).double()  # (N, C, d)
    target_f = torch.cat([f for _, f in adam_features(warm, target_rows, config, kind="sgd")]).double()  # (T, C, d)
    target_groups = [groups[t] for t in targets["sample_id"]]
    expected = []
    for i in range(12):
        per_target = [sum(mean_lrs[c] * F.cosine_similarity(pool_f[i, c], target_f[t, c], dim=0).item()
                          for c in range(2)) for t in range(4)]
        expected.append(max(np.mean([s for s, g in zip(per_target, target_groups, strict=True) if g == name])
                            for name in ("task0", "task1")))
    np.testing.assert_allclose(outcome.scores, expected, rtol=1e-5, atol=1e-9)
    assert outcome.sample_ids == list(pool["sample_id"])
    top = np.argsort(-np.asarray(expected), kind="stable")[:4]
    assert set(outcome.selected) == {outcome.sample_ids[i] for i in top}


def test_one_checkpoint_score_is_the_mean_cosine_over_targets_and_bad_shapes_are_refused():
    from idistill_core.errors import DataError
    from idistill_core.methods.less import less_scores

    gen = torch.Generator().manual_seed(1)
    pool = torch.randn(4, 6, generator=gen, dtype=torch.float64)  # (N, P): one checkpoint, weight 1
    targets = torch.randn(3, 6, generator=gen, dtype=torch.float64)  # (T, P)
    ids, got = less_scores([(["a", "b"], pool[:2]), (["c", "d"], pool[2:])], targets)
    expected = [np.mean([F.cosine_similarity(pool[i], targets[t], dim=0).item() for t in range(3)]) for i in range(4)]
    assert ids == ["a", "b", "c", "d"]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # one target is enough; groups without checkpoint weights take the max over the groups' means
    _, one = less_scores([(["a"], pool[:1])], targets[:1])
    np.testing.assert_allclose(one, [F.cosine_similarity(pool[0], targets[0], dim=0).item()], rtol=1e-12)
    _, grouped = less_scores([(["a"], pool[:1])], targets, ["x", "y", "x"])
    cos = [F.cosine_similarity(pool[0], targets[t], dim=0).item() for t in range(3)]
    np.testing.assert_allclose(grouped, [max(np.mean([cos[0], cos[2]]), cos[1])], rtol=1e-12)
    for bad in (targets[:0], targets[None]):
        with pytest.raises(DataError, match=r"target_grads must be \(T, P\) with T >= 1"):
            less_scores([(["a"], pool[:1])], bad)
    stacked = torch.stack([targets, targets])  # (C=2, T, P)
    for bad in (stacked[:, :0], stacked[:1], targets):
        with pytest.raises(DataError, match=r"target_grads must be \(C=2, T >= 1, P\)"):
            less_scores([(["a"], pool[:1, None].expand(1, 2, 6))], bad, checkpoint_weights=[0.5, 0.5])
    with pytest.raises(DataError, match="target_groups has 2 names for 3 target gradients"):
        less_scores([(["a"], pool[:1])], targets, ["x", "y"])
    with pytest.raises(DataError, match="pool_grads is empty"):
        less_scores([], targets)


@pytest.mark.parametrize(("total", "warmup"), [(6, 1), (10, 4), (10, 0), (2, 1), (5, 5)])
def test_warmup_schedule_is_transformers_linear_schedule_with_warmup(total, warmup):
    from transformers.optimization import _get_linear_schedule_with_warmup_lr_lambda as hf_lambda

    from idistill_core.methods.less import _linear_with_warmup

    for step in range(total + 1):
        expected = hf_lambda(step, num_warmup_steps=warmup, num_training_steps=total)
        assert _linear_with_warmup(step, total, warmup) == pytest.approx(expected, rel=1e-12, abs=1e-15), step


def test_features_are_not_projected_when_the_projection_would_not_shrink_them(tiny, data, warm):
    pool, _ = data
    row = _rows(pool, tiny.tokenizer, 9)[8]
    dim = sum(p.numel() for n, p in warm.model.named_parameters() if n in warm.names)
    wide = dataclasses.replace(CFG, proj_dim=dim)  # d = P: the raw Adam direction, unit-normalised
    (_, adam), = list(adam_features(warm, [row], wide))
    assert adam.shape == (1, 2, dim)
    # hand computation with an identity "projection"
    first = warm.checkpoints[0]
    model = copy.deepcopy(warm.model).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in warm.names:
            params[name].copy_(first.lora[name])
    logits = model(input_ids=row.input_ids).logits[0, :-1]
    labels = row.labels[0, 1:]
    loss = F.cross_entropy(logits[labels != -100], labels[labels != -100])
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, [params[n] for n in warm.names])]).double()
    m = torch.cat([first.exp_avg[n].reshape(-1) for n in warm.names]).double()
    v = torch.cat([first.exp_avg_sq[n].reshape(-1) for n in warm.names]).double()
    gamma = (0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g * g + 1e-8)
    torch.testing.assert_close(adam[0, 0].double(), F.normalize(gamma, dim=0), rtol=1e-4, atol=1e-5)


def test_pool_features_that_do_not_match_the_targets_are_refused():
    from idistill_core.errors import DataError
    from idistill_core.methods.less import less_scores

    targets = torch.ones(2, 3, 5, dtype=torch.float64)  # (C=2, T=3, P=5)
    for shape in [(1, 3, 5), (1, 2, 4), (1, 10)]:  # wrong C, wrong P, no checkpoint axis
        with pytest.raises(DataError, match="pool features have shape"):
            less_scores([(["a"], torch.ones(shape, dtype=torch.float64))], targets, checkpoint_weights=[1.0, 1.0])
