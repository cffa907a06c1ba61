"""LESS (idistill_core.methods.less): the Adam feature against a hand computation from the real AdamW state, the
checkpoint-weighted sub-task max against small hand-made tensors, a base-frozen warm-up, and `method: less`
end to end through run_selection."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idistill_core.methods.less import adam_features, less_scores
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.pipeline.run import run_selection
from idistill_core.steps.projection import RademacherProjector
from tests.conftest import TINY_MAX_LENGTH
from tests.core.conftest import LESS_CFG, less_rows

CFG = LESS_CFG
_rows = less_rows


def test_warmup_trains_lora_only_and_keeps_one_checkpoint_per_epoch(tiny, warm):
    base = dict(tiny.model.named_parameters())
    trained = dict(warm.model.named_parameters())
    assert warm.names and all("lora_" in n for n in warm.names)
    # every non-LoRA weight of the warmed copy equals the original model's, and the original is untouched
    frozen = {n: p for n, p in trained.items() if "lora_" not in n}
    assert not any(p.requires_grad for p in frozen.values())
    for name, p in frozen.items():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(p, base[key]), name
    # the LoRA weights moved (B starts at zero), and the two epochs' checkpoints differ
    first, last = warm.checkpoints
    assert [c.epoch for c in warm.checkpoints] == [1, 2] and last.step == 2 * first.step == 4
    b = next(n for n in warm.names if "lora_B" in n)
    assert first.lora[b].abs().sum() > 0 and not torch.equal(first.lora[b], last.lora[b])
    # mean lr per epoch of HF's linear schedule with warm-up: 4 steps, ceil(0.03 * 4) = 1 warm-up step
    lrs = [0.0, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3]
    assert first.mean_lr == pytest.approx(np.mean(lrs[:2])) and last.mean_lr == pytest.approx(np.mean(lrs[2:]))


def test_adam_feature_matches_a_hand_computation_from_the_real_adamw_state(tiny, data, warm):
    pool, _ = data
    row = _rows(pool, tiny.tokenizer, 8)[7]
    model = warm.model
    params = dict(model.named_parameters())
    last = warm.checkpoints[-1]
    # the checkpoint's moments are the optimizer's own state
    state = {n: warm.optimizer.state[params[n]] for n in warm.names}
    for n in warm.names:
        assert torch.equal(last.exp_avg[n], state[n]["exp_avg"]) and torch.equal(last.exp_avg_sq[n], state[n]["exp_avg_sq"])
    (ids, feats), = list(adam_features(warm, [row], CFG))  # leaves the model at the last checkpoint
    (_, sgd), = list(adam_features(warm, [row], CFG, kind="sgd"))
    model.eval()
    logits = model(input_ids=row.input_ids).logits[0, :-1]
    labels = row.labels[0, 1:]
    loss = F.cross_entropy(logits[labels != -100], labels[labels != -100])
    grads = torch.autograd.grad(loss, [params[n] for n in warm.names])
    g = torch.cat([x.reshape(-1) for x in grads]).double()
    m = torch.cat([state[n]["exp_avg"].reshape(-1) for n in warm.names]).double()
    v = torch.cat([state[n]["exp_avg_sq"].reshape(-1) for n in warm.names]).double()
    gamma = (0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g * g + 1e-8)
    proj = RademacherProjector(g.numel(), 64, seed=CFG.seed).matrix().double()
    expected = F.normalize(gamma @ proj, dim=0)
    assert ids == list(row.sample_ids) and feats.shape == (1, 2, 64)
    torch.testing.assert_close(feats[0, 1].double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sgd[0, 1].double(), F.normalize(g @ proj, dim=0), rtol=1e-4, atol=1e-5)
    assert (feats[0, 1] - sgd[0, 1]).abs().max() > 1e-2  # the Adam direction is not the plain gradient


def test_checkpoint_weighted_subtask_max_matches_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)  # (N, C, P)
    targets = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)  # (C, T, P)
    groups = ["b", "a", "b", "b"]
    w = [0.7, 0.2]
    ids, got = less_scores([(["p0", "p1"], pool[:2]), (["p2"], pool[2:])], targets, groups, w)
    expected = []
    for i in range(3):
        total = [sum(w[c] * F.cosine_similarity(pool[i, c], targets[c, t], dim=0).item() for c in range(2)) for t in range(4)]
        expected.append(max(total[1], np.mean([total[0], total[2], total[3]])))
    assert ids == ["p0", "p1", "p2"]
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_method_less_runs_end_to_end_and_is_deterministic_for_a_seed(tiny, data, tmp_path):
    pool, targets = data
    pool, targets = pool.select(range(16)), targets.select(range(4))
    recipe = SelectionRecipe(method="less", max_length=TINY_MAX_LENGTH, batch_size=8, less=dataclasses.replace(CFG, warmup_fraction=0.25))
    subtasks = {t: f"task{i % 2}" for i, t in enumerate(targets["sample_id"])}
    a = run_selection(tiny.model, tiny.tokenizer, tiny.fingerprint, pool, targets, 5, recipe, tmp_path / "a",
                      target_subtasks=subtasks).outcome
    b = run_selection(tiny.model, tiny.tokenizer, tiny.fingerprint, pool, targets, 5, recipe, tmp_path / "b",
                      target_subtasks=subtasks).outcome
    assert a.method == "less" and len(a.selected) == 5 and a.sample_ids == list(pool["sample_id"])
    assert a.selected == b.selected and np.array_equal(a.scores, b.scores)
    assert len(a.details["warmup_ids"]) == 4 and len(a.details["checkpoint_weights"]) == 2
    assert a.details["subtasks"] == ["task0", "task1"]
    # the selection is the top-5 of the LESS scores
    order = np.argsort(-a.scores, kind="stable")[:5]
    assert set(a.selected) == {a.sample_ids[i] for i in order}
    other = run_selection(
        tiny.model, tiny.tokenizer, tiny.fingerprint, pool, targets, 5,
        dataclasses.replace(recipe, less=dataclasses.replace(recipe.less, seed=4)), tmp_path / "c", target_subtasks=subtasks,
    ).outcome
    assert not np.array_equal(a.scores, other.scores)
