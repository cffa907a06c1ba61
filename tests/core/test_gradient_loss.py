"""The per-sample gradient's loss computes the LM head only where a label is supervised (``logits_to_keep``): the
same loss and gradient as the full-vocabulary head over every position, on a row whose prompt is unsupervised."""

import torch

from idistill_core.data.batch import IGNORE_INDEX, collate
from idistill_core.steps import gradients as G
from tests.conftest import tiny_llama


def _row():
    ids = list(range(3, 23))
    labels = [IGNORE_INDEX] * 14 + ids[14:]  # a 14-token prompt, a 6-token answer
    return collate([{"sample_id": "a", "input_ids": ids, "labels": labels}], pad_token_id=0)


def test_the_supervised_head_gives_the_full_loss_and_gradient():
    model = tiny_llama(fork_rng=True).double()
    one = _row()
    assert G._takes_logits_to_keep(model)
    names = G.select_parameters(model, "down_proj")
    targets = [dict(model.named_parameters())[n] for n in names]
    full = G._row_loss(model, one, keep_logits=False)
    kept = G._row_loss(model, one, keep_logits=True)
    torch.testing.assert_close(kept, full, rtol=1e-12, atol=0)
    # float64 model, but LlamaRMSNorm computes in float32: the two heads' backward round apart at ~1e-7
    for a, b in zip(torch.autograd.grad(kept, targets), torch.autograd.grad(full, targets), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * float(b.abs().max()))
    # and the loop (what iter_gradients runs at batch 1) uses it: its gradients are the full loss's
    got = G._loop_grads(model, one, names)
    for name, b in zip(names, torch.autograd.grad(G._row_loss(model, one, False), targets), strict=True):
        torch.testing.assert_close(got[name][0], b, rtol=0, atol=1e-6 * float(b.abs().max()))


def test_a_model_without_logits_to_keep_gets_the_full_head():
    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    inner = tiny_llama(fork_rng=True).double()
    model = Plain(inner)
    assert not G._takes_logits_to_keep(model)
    names = G.select_parameters(model, "down_proj")
    got = G._loop_grads(model, _row(), names)
    want = G._loop_grads(inner, _row(), [n.removeprefix("inner.") for n in names])
    for name in names:  # the wrapper's full head vs the inner model's kept one: equal up to float32 norms
        want_g = want[name.removeprefix("inner.")]
        torch.testing.assert_close(got[name], want_g, rtol=0, atol=1e-6 * float(want_g.abs().max()))
