"""Warm-up trains with the HF loss, and the Adam preconditioner predicts the next AdamW step."""

import copy

import pytest
import torch

from idistill_core.data.batch import collate
from idistill_core.errors import ConfigError, DataError
from idistill_core.steps.gradients import select_parameters
from idistill_core.steps.warmup import WarmupConfig, adam_preconditioner, warmup
from tests.conftest import tiny_llama


def _tiny():
    return tiny_llama(0).double()


def _batches(n_batches=2, rows=3):
    gen = torch.Generator().manual_seed(1)
    out = []
    for b in range(n_batches):
        ex = []
        for r in range(rows):
            n = 5 + (3 * r + b) % 6
            ids = torch.randint(1, 64, (n,), generator=gen).tolist()
            ex.append({"sample_id": f"b{b}r{r}", "input_ids": ids, "labels": [-100] * 2 + ids[2:]})
        out.append(collate(ex, pad_token_id=0))
    return out


def test_one_warmup_step_equals_a_manual_adamw_step_on_the_hf_loss():
    model = _tiny()
    reference = copy.deepcopy(model)
    batch = _batches(1)[0]
    # A first Adam step is ~lr·sign(g); a large eps makes it smooth in g, so float round-off in tiny
    # gradient entries cannot flip a sign and the comparison can be tight.
    config = WarmupConfig(steps=1, batch_size=8, lr=1e-2, weight_decay=0.1, eps=1e-2, max_grad_norm=0.5)
    warmup(model, [batch], config)

    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-2)
    loss = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    opt.step()
    moved = 0.0
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)  # float32-internal HF ops
        moved = max(moved, (p - _tiny().get_parameter(name)).abs().max().item())
    assert moved > 1e-3


def test_warmup_cycles_batches_and_returns_optimizer_state():
    model = _tiny()
    batches = _batches(2, rows=4)
    initial = _loss(model, batches)
    opt = warmup(model, batches, WarmupConfig(steps=7, batch_size=2, lr=3e-3, seed=1))
    assert type(opt) is torch.optim.AdamW
    state = opt.state[model.model.layers[0].mlp.down_proj.weight]
    assert int(state["step"]) == 7 and state["exp_avg_sq"].abs().sum() > 0
    assert _loss(model, batches) < initial


def _loss(model, batches):
    with torch.no_grad():
        return sum(
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss.item()
            for b in batches
        )


def _warm(weight_decay=0.1, amsgrad=False):
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay, amsgrad=amsgrad)
    for batch in _batches(2):
        opt.zero_grad()
        model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss.backward()
        opt.step()
    return model, opt


def _step_with(model, opt, grads):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("amsgrad", [False, True])
def test_preconditioner_predicts_adamw_step_exactly_when_v_is_unchanged(amsgrad):
    model, opt = _warm(amsgrad=amsgrad)
    names = select_parameters(model, "all")
    pre = adam_preconditioner(model, opt, names)
    assert pre.step == 2 and pre.lr == 1e-2
    gen = torch.Generator().manual_seed(0)
    # g^2 = v keeps v_{t+1} = β2 v + (1-β2) g^2 = v (and max(v_max, v) = v_max when v_max = v), which is
    # exactly the frozen-v assumption of the reconstruction; the signs are random.
    key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
    grads = {}
    for n, p in model.named_parameters():
        sign = torch.randint(0, 2, p.shape, generator=gen).double() * 2 - 1
        grads[n] = sign * opt.state[p][key].sqrt()
    predicted = {n: -pre.lr * (pre.b[n] + pre.a[n] * grads[n]) for n in names}
    actual = _step_with(model, opt, grads)
    for n in names:
        scale = actual[n].abs().max()
        assert scale > 0
        torch.testing.assert_close(predicted[n], actual[n], rtol=0, atol=1e-10 * scale, msg=n)


def test_preconditioner_is_close_for_a_generic_gradient():
    model, opt = _warm()
    names = select_parameters(model, "down_proj")
    pre = adam_preconditioner(model, opt, names)
    gen = torch.Generator().manual_seed(1)
    grads = {}
    for n, p in model.named_parameters():
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        grads[n] = g * opt.state[p]["exp_avg_sq"].sqrt()
    predicted = {n: -pre.lr * (pre.b[n] + pre.a[n] * grads[n]) for n in names}
    actual = _step_with(model, opt, grads)
    for n in names:
        rel = (predicted[n] - actual[n]).norm() / actual[n].norm()
        # v moves by (1-β2)(g²-v) ~ 1e-3 of itself, so the step changes by ~5e-4; not exactly zero.
        assert 1e-7 < rel < 5e-3, (n, rel)


def test_preconditioner_formula_bias_corrections_at_next_step():
    model, opt = _warm(weight_decay=0.0)
    name = "model.layers.0.mlp.down_proj.weight"
    pre = adam_preconditioner(model, opt, [name])
    state = opt.state[model.get_parameter(name)]
    t = 2
    v_hat = state["exp_avg_sq"] / (1 - 0.999 ** (t + 1))
    denom = v_hat.sqrt() + 1e-8
    torch.testing.assert_close(pre.a[name], (0.1 / (1 - 0.9 ** (t + 1))) / denom)
    torch.testing.assert_close(pre.b[name], (0.9 / (1 - 0.9 ** (t + 1))) * state["exp_avg"] / denom)


def test_optimizer_kinds():
    model = _tiny()
    names = select_parameters(model, "down_proj")
    none = adam_preconditioner(model, None, names)
    assert none.lr == 0 and all(torch.equal(none.a[n], torch.ones_like(none.a[n])) for n in names)
    assert all(not none.b[n].any() for n in names)
    batch = _batches(1)[0]

    def stepped(opt):
        opt.zero_grad()
        model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss.backward()
        opt.step()
        return opt

    with pytest.raises(ConfigError, match="use AdamW"):
        adam_preconditioner(model, stepped(torch.optim.Adam(model.parameters(), weight_decay=0.01)), names)
    assert adam_preconditioner(model, stepped(torch.optim.Adam(model.parameters())), names).step == 1
    with pytest.raises(ConfigError, match="unsupported optimizer RMSprop"):
        adam_preconditioner(model, stepped(torch.optim.RMSprop(model.parameters())), names)
    with pytest.raises(ConfigError, match="no state for parameter"):
        adam_preconditioner(model, torch.optim.AdamW(model.parameters()), names)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="WarmupConfig.steps"):
        WarmupConfig(steps=0)
    with pytest.raises(DataError, match="no batches"):
        warmup(_tiny(), [], WarmupConfig(steps=1))
    batch = _batches(1)[0]
    batch.labels[:] = -100
    with pytest.raises(DataError, match="sample 'b0r0' has no supervised token"):
        warmup(_tiny(), [batch], WarmupConfig(steps=1))
