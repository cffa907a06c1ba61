"""The truncated forward reproduces the full model's hidden states, padding-aware, for Llama and Qwen2."""

import pytest
import torch
import transformers

from idistill_core.errors import ModelError
from idistill_core.models.architecture import (
    attention_inputs,
    decoder_parts,
    eager_attention,
    truncated_forward,
)


def _tiny(kind: str, layers: int = 3, attn: str = "eager"):
    common = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attn_implementation": attn,
    }
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():
        # Non-trivial norm weights, so that a missing or doubled final norm is visible.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.double().eval()


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_truncated_forward_equals_normed_hidden_state_of_full_model(kind):
    model = _tiny(kind)
    ids, mask = _batch()
    parts = decoder_parts(model)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        # Bitwise-level tolerance on purpose: both sides run the same ops on the same (3, 9) batch in one
        # process (the same float32 rotary kernel too), so they are identical by construction.
        for k in (1, 2):
            ours = truncated_forward(model, ids, mask, k)
            torch.testing.assert_close(ours, parts.norm(hidden[k]), rtol=0, atol=1e-12)
        # transformers 5.x stores the last hidden state already normed.
        torch.testing.assert_close(truncated_forward(model, ids, mask, 3), hidden[3], rtol=0, atol=1e-12)


# The model is float64, but transformers computes the rotary cos/sin in float32 (inv_freq @ positions), and
# that small matmul takes a different kernel for a (3, 9) batch than for one (1, n) row on some CPUs (AVX2:
# 3.6e-7 apart; AVX-512: identical). Angles reach 8 rad, so they carry a few float32 ulps, which two blocks
# pass on to O(1) normed outputs: 64 float32 eps (7.6e-6). A real padding leak moves rows by O(0.1-1).
PADDING_TOL = 64 * torch.finfo(torch.float32).eps


def test_right_padding_does_not_change_real_rows():
    model = _tiny("llama")
    ids, mask = _batch()
    with torch.no_grad():
        batched = truncated_forward(model, ids, mask, 2)
        for row in range(3):
            n = int(mask[row].sum())
            alone = truncated_forward(model, ids[row : row + 1, :n], mask[row : row + 1, :n], 2)
            torch.testing.assert_close(batched[row, :n], alone[0], rtol=0, atol=PADDING_TOL)


def test_sdpa_model_runs_eager_for_the_pass_and_is_restored():
    model = _tiny("llama", attn="sdpa")
    ids, mask = _batch()
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
        # Forward-mode AD through the blocks works only with eager attention on CPU.
        emb = decoder_parts(model).embed_tokens(ids)
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(emb, torch.ones_like(emb))
            layer = decoder_parts(model).layers[0]
            masks, rope = attention_inputs(decoder_parts(model), mask, 1, emb.dtype)
            out = layer(dual, attention_mask=masks[0], position_embeddings=rope)
            assert torch.autograd.forward_ad.unpack_dual(out).tangent is not None
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        # sdpa and eager differ by float rounding only.
        torch.testing.assert_close(
            truncated_forward(model, ids, mask, 1), decoder_parts(model).norm(full), rtol=0, atol=1e-6
        )


def test_unsupported_model_names_its_class():
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=16)
    )
    with pytest.raises(ModelError, match="GPT2LMHeadModel"):
        decoder_parts(model)


def test_num_blocks_out_of_range_is_rejected():
    model = _tiny("llama")
    ids, mask = _batch()
    with pytest.raises(ModelError, match="num_blocks"):
        truncated_forward(model, ids, mask, 4)
