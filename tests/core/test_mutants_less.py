"""LESS behaviour that mutmut's survivors showed no test pinned (docs/mutation-testing.md): the per-source cap
through ``less_select`` and ``method: less``, the sub-task checks and the one-group default, the one-row
warm-up floor, and sub-tasks following target ids, not file positions. Numbers are checked against a hand
top-k or against LESS run on each target alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from idistill_core.errors import ConfigError
from idistill_core.methods.less import LessConfig, less_outcome, less_select
from idistill_core.pipeline.recipe import SelectionRecipe
from idistill_core.pipeline.run import run_selection
from tests.conftest import TINY_MAX_LENGTH
from tests.core.conftest import LESS_CFG


def test_less_select_is_the_top_k_within_the_per_source_cap():
    ids = ["a", "b", "c", "d", "e"]
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.5], dtype=np.float32)
    sources = ["x", "x", "x", "y", "y"]
    assert less_select(ids, scores, 3).sample_ids == ["a", "b", "c"]
    capped = less_select(ids, scores, 3, sources=sources, per_source_cap=2)
    assert capped.sample_ids == ["a", "b", "e"]  # c (0.7) is x's third; e is y's best
    assert capped.scores.dtype == np.float64


def test_less_outcome_names_a_target_without_a_sub_task_before_any_training(tiny, data):
    pool, targets = data
    targets = targets.select(range(3))
    ids = list(targets["sample_id"])
    with pytest.raises(ConfigError, match=f"target sample '{ids[2]}' has no sub-task"):
        less_outcome(tiny.model, tiny.tokenizer, pool.select(range(8)), targets, 2, LESS_CFG,
                     target_subtasks={ids[0]: "a", ids[1]: "b"})


def test_less_without_sub_tasks_is_one_group_and_a_tiny_pool_still_warms_up_on_one_row(tiny, data):
    pool, targets = data
    pool, targets = pool.select(range(5)), targets.select(range(2))
    config = dataclasses.replace(LESS_CFG, warmup_fraction=0.1)  # int(5 * 0.1) = 0 rows: the floor is 1
    outcome = less_outcome(tiny.model, tiny.tokenizer, pool, targets, 2, config)
    assert outcome.details["subtasks"] == ["all"]
    assert len(outcome.details["warmup_ids"]) == 1
    assert len(outcome.details["checkpoint_weights"]) == config.epochs


def test_sub_tasks_follow_the_target_ids_whatever_the_file_order(tiny, data):
    """The score is ``max_g mean_{t∈g} s_t`` with ``s_t`` the score against target ``t`` alone (LESS on a
    one-row target set, the same seeded warm-up); targets of different lengths, listed longest first, so a
    length-sorted batch would pair features with the wrong sub-task."""
    pool, targets = data
    pool = pool.select(range(10))
    order = sorted(range(len(targets)), key=lambda i: -len(targets[i]["input_ids"]))[:4]
    lengths = [len(targets[i]["input_ids"]) for i in order]
    assert len(set(lengths)) > 1
    targets = targets.select(order)
    ids = list(targets["sample_id"])
    # one target against three: the max over groups is blind to group names, not to who is alone
    groups = {ids[0]: "a", ids[1]: "b", ids[2]: "b", ids[3]: "b"}
    config = dataclasses.replace(LESS_CFG, warmup_fraction=0.3)

    def run(rows, subtasks=None):
        return less_outcome(tiny.model, tiny.tokenizer, pool, rows, 3, config, batch_size=4,
                            target_subtasks=subtasks).scores

    alone = {t: run(targets.select([i])) for i, t in enumerate(ids)}
    expected = np.maximum(*(np.mean([alone[t] for t in ids if groups[t] == g], axis=0) for g in ("a", "b")))
    np.testing.assert_allclose(run(targets, groups), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(run(targets.select([3, 2, 1, 0]), groups), expected, rtol=1e-5, atol=1e-7)


def test_method_less_keeps_the_recipes_per_source_cap_and_times_its_run(tiny, data, tmp_path):
    pool, targets = data
    pool, targets = pool.select(range(16)), targets.select(range(2))
    recipe = SelectionRecipe(method="less", max_length=TINY_MAX_LENGTH, batch_size=8,
                             less=dataclasses.replace(LESS_CFG, warmup_fraction=0.25))
    free = run_selection(tiny.model, tiny.tokenizer, tiny.fingerprint, pool, targets, 3, recipe, tmp_path / "a")
    ranked = [free.outcome.sample_ids[i] for i in np.lexsort((free.outcome.sample_ids, -free.outcome.scores))]
    assert list(free.outcome.selected) == ranked[:3]
    # the two best share a source, every other row has its own: a cap of 1 must skip the second best
    source = {s: "shared" if s in ranked[:2] else s for s in ranked}
    capped = run_selection(tiny.model, tiny.tokenizer, tiny.fingerprint, pool, targets, 3,
                           dataclasses.replace(recipe, per_source_cap=1), tmp_path / "b", source_of=source)
    assert list(capped.outcome.selected) == [ranked[0], ranked[2], ranked[3]]
    assert capped.timings["baseline"] > 0


def test_less_config_fingerprint_changes_with_every_field_it_holds():
    base = LessConfig()
    assert base.fingerprint() == LessConfig().fingerprint()
    assert base.fingerprint() != dataclasses.replace(base, seed=base.seed + 1).fingerprint()
    assert base.fingerprint() != dataclasses.replace(base, lora_rank=base.lora_rank + 1).fingerprint()


def test_warmup_builds_the_configured_lora_and_adamw_and_applies_the_schedule_to_the_optimizer(tiny, data):
    """Every field reaches peft and AdamW (non-default values), and the optimizer really runs the warm-up schedule:
    4 steps with ``ceil(0.5 · 4) = 2`` warm-up steps give lrs ``[0, 0.5, 1, 0.5] × lr`` (HF's linear schedule)."""
    from idistill_core.methods.less import lora_warmup
    from tests.core.conftest import less_rows

    pool, _ = data
    config = dataclasses.replace(LESS_CFG, epochs=2, batch_size=1, warmup_ratio=0.5, lora_rank=3, lora_alpha=None,
                                 lora_dropout=0.05, target_modules=("k_proj", "o_proj"), lr=1e-3,
                                 betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02)
    warm = lora_warmup(tiny.model, less_rows(pool, tiny.tokenizer, 2), config)
    lora = warm.model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (3, 12, 0.05)  # 4 × rank, not peft's default 8
    # not peft's own default for Llama (q_proj, v_proj)
    assert sorted(lora.target_modules) == ["k_proj", "o_proj"] and str(lora.task_type).endswith("CAUSAL_LM")
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in warm.names} == {"k_proj", "o_proj"}
    group = warm.optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.02)  # not AdamW's 0.01
    lrs = [0.0, 0.5e-3, 1e-3, 0.5e-3]
    assert [c.mean_lr for c in warm.checkpoints] == pytest.approx([np.mean(lrs[:2]), np.mean(lrs[2:])])
    assert group["lr"] == pytest.approx(lrs[-1])  # the last step's scheduled lr, not the configured peak


def test_warmup_takes_a_row_supervised_from_its_second_token_and_names_a_row_with_none(tiny, data):
    from idistill_core.errors import DataError
    from idistill_core.methods.less import lora_warmup
    from tests.core.conftest import less_rows

    pool, _ = data
    first, second = less_rows(pool, tiny.tokenizer, 2)
    full = dataclasses.replace(first, labels=first.input_ids.clone())  # every token supervised
    late = dataclasses.replace(second, labels=torch.full_like(second.labels, -100))
    late.labels[0, 1] = late.input_ids[0, 1]  # the only supervised token is the second one
    config = dataclasses.replace(LESS_CFG, epochs=1, lora_rank=1, proj_dim=8)
    assert len(lora_warmup(tiny.model, [full, late], config).checkpoints) == 1
    none = dataclasses.replace(second, labels=torch.full_like(second.labels, -100))
    with pytest.raises(DataError, match=f"LESS warm-up sample '{second.sample_ids[0]}' has no supervised token"):
        lora_warmup(tiny.model, [full, none], config)


def test_one_warmup_step_averages_the_per_sample_mean_token_loss_gradients(tiny, data):
    """After one unclipped step from ``B = 0`` (where ``A`` gets no gradient and stays at its init), the LoRA B
    moments are ``(1 − β1) · mean_i g_i`` with ``g_i`` each row's own mean-token-loss gradient at the init."""
    import copy

    from idistill_core.methods.less import lora_warmup
    from idistill_core.steps.gradients import mean_token_loss
    from tests.core.conftest import less_rows

    pool, _ = data
    rows = less_rows(pool, tiny.tokenizer, 2)
    config = dataclasses.replace(LESS_CFG, epochs=1, batch_size=2, max_grad_norm=None, lora_rank=2, lora_dropout=0.0)
    warm = lora_warmup(tiny.model, rows, config)
    init = copy.deepcopy(warm.model)
    params = dict(init.named_parameters())
    for name in warm.names:
        if "lora_B" in name:
            params[name].data.zero_()
    b_names = [n for n in warm.names if "lora_B" in n]
    per_row = []
    for row in rows:
        loss = mean_token_loss(init(input_ids=row.input_ids, attention_mask=row.attention_mask).logits, row.labels)[0]
        per_row.append(torch.autograd.grad(loss, [params[n] for n in b_names]))
    beta1 = config.betas[0]
    for k, name in enumerate(b_names):
        expected = (1 - beta1) * (per_row[0][k] + per_row[1][k]) / 2
        torch.testing.assert_close(warm.checkpoints[0].exp_avg[name], expected, rtol=1e-4, atol=1e-7)


def _fake_per_sample(values):
    """A stand-in for ``steps.gradients._per_sample`` returning fixed per-row gradients for every LoRA tensor."""
    def per_sample(model, batch, names, chunk):
        params = dict(model.named_parameters())
        return {n: torch.stack([torch.full_like(params[n], v) for v in values]) for n in names}
    return per_sample


@pytest.mark.parametrize("values, message", [
    ([1.0, float("nan"), 1.0], "non-finite LESS feature"),
    ([1.0, 0.0, 1.0], "zero LESS feature cannot be normalised"),
])
def test_a_bad_feature_is_refused_naming_its_own_sample(tiny, data, warm, monkeypatch, values, message):
    from idistill_core.errors import NumericalError
    from idistill_core.methods import less

    pool, _ = data
    batch = next(iter(less.iter_batches(pool.select(range(3)), 3, less.pad_id(tiny.tokenizer))))
    monkeypatch.setattr(less, "_per_sample", _fake_per_sample(values))
    with pytest.raises(NumericalError, match=f"sample '{batch.sample_ids[1]}': {message}"):
        list(less.adam_features(warm, [batch], LESS_CFG, kind="sgd"))


def test_features_of_a_batch_are_each_rows_own_features(tiny, data, warm):
    from idistill_core.methods.less import adam_features, iter_batches, pad_id
    from tests.core.conftest import less_rows

    pool, _ = data
    together = next(iter(iter_batches(pool.select(range(2)), 2, pad_id(tiny.tokenizer))))
    (_, both), = list(adam_features(warm, [together], LESS_CFG))
    alone = torch.cat([f for _, f in adam_features(warm, less_rows(pool, tiny.tokenizer, 2), LESS_CFG)])
    torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both.norm(dim=2), torch.ones(2, LESS_CFG.epochs), rtol=1e-5, atol=1e-5)


def test_less_outcome_spreads_the_pool_size_evenly_over_the_picks(tiny, data):
    pool, targets = data
    pool, targets = pool.select(range(6)), targets.select(range(1))
    outcome = less_outcome(tiny.model, tiny.tokenizer, pool, targets, 2,
                           dataclasses.replace(LESS_CFG, warmup_fraction=0.3))
    expected = [3.0 if s in outcome.selected else 0.0 for s in outcome.sample_ids]
    assert list(outcome.weights) == expected


@pytest.mark.parametrize("field, accepted, refused, message", [
    ("seed", [0, 2**32 - 1], [-1, 2**32], r"seed must be in \[0, 2\*\*32 - 1\]"),
    ("weight_decay", [0.0, 0.5], [-1.0, float("inf")], "weight_decay must be finite and >= 0"),
    ("warmup_fraction", [1e-9, 1.0], [0.0, 1.5], r"warmup_fraction must be in \(0, 1\]"),
    ("lora_alpha", [None, 0.5, 2.0], [0.0, -1.0], "lora_alpha must be > 0 or None"),
    ("lora_dropout", [0.0, 0.99], [1.0, 1.5, -0.1], r"lora_dropout must be in \[0, 1\)"),
    ("lr", [1e-9], [0.0, -1.0], "lr must be > 0"),
    ("warmup_ratio", [0.0, 0.99], [1.0, -0.1], r"warmup_ratio must be in \[0, 1\)"),
    ("betas", [(0.0, 0.5)], [(0.9,), (0.9, 1.0)], r"betas must be two values in \[0, 1\)"),
    ("eps", [1e-12], [0.0], "eps must be > 0"),
    ("max_grad_norm", [None, 0.1], [0.0], "max_grad_norm must be > 0 or None"),
])
def test_less_config_accepts_the_edges_of_each_range_and_refuses_just_outside(field, accepted, refused, message):
    for value in accepted:
        assert getattr(LessConfig(**{field: value}), field) == value
    for value in refused:
        with pytest.raises(ConfigError, match=rf"^LessConfig\.{message}; got "):
            LessConfig(**{field: value})
