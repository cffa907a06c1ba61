"""Behaviour of idistill_core.train: the loss and update it computes, checkpoints, cache reuse, validation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from idistill_core.errors import ConfigError, DataError
from idistill_core.train import FinetuneConfig, finetune, save_checkpoint
from tests.conftest import tiny_llama as shared_tiny_llama

VOCAB = 64


def tiny_llama(
    seed: int = 0, dtype: torch.dtype = torch.float32, tied: bool = True
) -> transformers.LlamaForCausalLM:
    model = shared_tiny_llama(
        seed, fork_rng=True, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=tied
    )
    return model.to(dtype)


def make_examples(n: int, seed: int = 0) -> list[dict]:
    """Examples of varied length; the first third of each is an unsupervised 'prompt'."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 6 + (i * 5) % 11
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        prompt = length // 3
        examples.append({"sample_id": f"s{i}", "input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def per_example_ce_sum(model, example) -> tuple[torch.Tensor, int]:
    """Independent reference: HF's own mean CE on one unpadded example, times its supervised count."""
    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor([example["labels"]])
    n = int((labels[0, 1:] != -100).sum())
    return model(input_ids=ids, labels=labels).loss * n, n


def test_one_step_matches_plain_autograd_adamw_step():
    examples = make_examples(8)
    model = tiny_llama(dtype=torch.float64)
    reference = copy.deepcopy(model)
    for p in model.parameters():  # stale gradients from earlier work must not leak into the first step
        p.grad = torch.full_like(p, 3.0)
    config = FinetuneConfig(
        lr=1e-2, max_steps=1, batch_size=8, warmup_ratio=0.0, max_grad_norm=0.5, precision="fp32"
    )
    result = finetune(model, None, examples, config)

    sums, counts = zip(*(per_example_ce_sum(reference, e) for e in examples))
    loss = torch.stack(sums).sum() / sum(counts)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0).step()

    assert result.losses[0] == pytest.approx(loss.item(), rel=1e-7)
    assert result.steps == 1 and result.supervised_tokens == sum(counts)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_grad_accumulation_normalises_by_tokens_of_the_whole_step():
    # Lengths differ, so a mean of per-micro-batch means would give a different loss and update.
    # (LlamaRMSNorm computes in float32 even in a float64 model, hence tolerances near 1e-7.)
    examples = make_examples(8)
    one = tiny_llama(dtype=torch.float64)
    two = copy.deepcopy(one)
    base = {"lr": 1e-2, "max_steps": 1, "warmup_ratio": 0.0, "precision": "fp32"}
    r1 = finetune(one, None, examples, FinetuneConfig(batch_size=8, grad_accum=1, **base))
    r2 = finetune(two, None, examples, FinetuneConfig(batch_size=2, grad_accum=4, **base))
    assert r1.losses[0] == pytest.approx(r2.losses[0], rel=1e-7)
    for p, q in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_sample_weights_scale_each_samples_token_losses():
    examples = make_examples(6)
    weights = {e["sample_id"]: w for e, w in zip(examples, [0.0, 2.0, 1.0, 0.5, 3.0, 1.0])}
    model = tiny_llama(dtype=torch.float64)
    reference = copy.deepcopy(model)
    config = FinetuneConfig(max_steps=1, batch_size=6, precision="fp32", use_weights=True)
    result = finetune(model, None, examples, config, weights=weights)

    with torch.no_grad():
        sums, counts = zip(*(per_example_ce_sum(reference, e) for e in examples))
    expected = sum(weights[e["sample_id"]] * s for e, s in zip(examples, sums)) / sum(counts)
    assert result.losses[0] == pytest.approx(float(expected), rel=1e-7)

    unweighted = finetune(
        copy.deepcopy(reference),
        None,
        examples,
        FinetuneConfig(max_steps=1, batch_size=6, precision="fp32"),
        weights=weights,
    )
    assert unweighted.losses[0] == pytest.approx(float(sum(sums) / sum(counts)), rel=1e-7)


def test_weights_column_is_used_and_missing_weights_are_an_error():
    examples = [dict(e, weight=2.0) for e in make_examples(4)]
    config = FinetuneConfig(max_steps=1, batch_size=4, precision="fp32", use_weights=True)
    weighted = finetune(tiny_llama(dtype=torch.float64), None, examples, config)
    plain = finetune(
        tiny_llama(dtype=torch.float64),
        None,
        examples,
        FinetuneConfig(max_steps=1, batch_size=4, precision="fp32"),
    )
    assert weighted.losses[0] == pytest.approx(2 * plain.losses[0], rel=1e-7)
    with pytest.raises(DataError, match="'s0'"):
        finetune(tiny_llama(), None, make_examples(4), config)


def test_tiny_model_overfits_a_tiny_subset():
    examples = make_examples(8)
    result = finetune(
        tiny_llama(),
        None,
        examples,
        FinetuneConfig(lr=1e-2, max_steps=40, batch_size=4, warmup_ratio=0.1, precision="fp32"),
    )
    assert len(result.losses) == 40
    first, last = sum(result.losses[:2]) / 2, sum(result.losses[-2:]) / 2
    assert last < 0.5 * first, (first, last)


def test_epochs_visit_every_sample_once_per_epoch():
    examples = make_examples(7)
    supervised = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)
    tokens = sum(len(e["input_ids"]) for e in examples)
    result = finetune(
        tiny_llama(),
        None,
        examples,
        FinetuneConfig(epochs=2, max_steps=None, batch_size=3, grad_accum=2, precision="fp32"),
    )
    # 3 micro-batches per epoch (3+3+1), grouped in pairs across the whole run -> ceil(6 / 2).
    assert result.steps == 3 and len(result.losses) == 3
    assert result.supervised_tokens == 2 * supervised
    assert result.tokens == 2 * tokens


def test_bf16_autocast_first_loss_is_close_to_fp32():
    examples = make_examples(8)
    cfg = {"max_steps": 1, "batch_size": 8}
    fp32 = finetune(tiny_llama(), None, examples, FinetuneConfig(precision="fp32", **cfg))
    bf16 = finetune(tiny_llama(), None, examples, FinetuneConfig(precision="bf16-autocast", **cfg))
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], rel=2e-2)
    assert bf16.losses[0] != fp32.losses[0]  # autocast really ran in bf16


def test_gradient_checkpointing_gives_the_same_update():
    examples = make_examples(4)
    plain = tiny_llama(dtype=torch.float64)
    ckpt = copy.deepcopy(plain)
    base = {"lr": 1e-2, "max_steps": 2, "batch_size": 4, "precision": "fp32"}
    finetune(plain, None, examples, FinetuneConfig(**base))
    finetune(ckpt, None, examples, FinetuneConfig(gradient_checkpointing=True, **base))
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_saved_tied_checkpoint_reloads_to_identical_logits(tmp_path):
    model = tiny_llama(tied=True)
    out = tmp_path / "ft"
    result = finetune(
        model,
        None,
        make_examples(8),
        FinetuneConfig(lr=1e-2, max_steps=3, batch_size=4, precision="fp32"),
        out_dir=out,
    )
    assert result.path == out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["losses"] == result.losses and summary["steps"] == 3
    assert summary["config"]["lr"] == 1e-2
    assert [p.name for p in tmp_path.iterdir()] == ["ft"]  # no temp dir left behind

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([make_examples(1, seed=5)[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_saving_over_an_existing_dir_replaces_it_whole(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_checkpoint(tiny_llama(), None, out, summary={"x": 1})
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "train_summary.json").read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_same_config_and_data_reuses_the_checkpoint_instead_of_retraining(tmp_path):
    examples = make_examples(8)
    config = FinetuneConfig(lr=1e-2, max_steps=3, batch_size=4, precision="fp32")
    out = tmp_path / "ft"
    trained = tiny_llama()
    first = finetune(trained, None, examples, config, out_dir=out)
    mtime = (out / "model.safetensors").stat().st_mtime_ns

    fresh = tiny_llama()  # the same base model, as a new process would load it
    again = finetune(fresh, None, examples, config, out_dir=out)
    assert again.cached and not first.cached
    assert again.losses == first.losses and again.seconds == first.seconds
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    for p, q in zip(fresh.parameters(), trained.parameters()):  # the cached weights were loaded
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    changed = finetune(
        tiny_llama(),
        None,
        examples,
        FinetuneConfig(lr=2e-2, max_steps=3, batch_size=4, precision="fp32"),
        out_dir=out,
    )
    assert not changed.cached and changed.losses != first.losses
    assert json.loads((out / "train_summary.json").read_text())["config"]["lr"] == 2e-2

    other_data = finetune(tiny_llama(), None, make_examples(8, seed=1), config, out_dir=out)
    assert not other_data.cached


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"epochs": 2, "max_steps": 10}, "epochs"),
        ({"epochs": None, "max_steps": None}, "epochs"),
        ({"max_steps": 0}, "max_steps"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"precision": "fp16"}, "precision"),
        ({"lora_rank": 0}, "lora_rank"),
    ],
)
def test_bad_config_fields_are_rejected_by_name(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        FinetuneConfig(**kwargs)


def test_lora_without_peft_says_how_to_install_it():
    pytest.importorskip("transformers")
    try:
        import peft  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("peft is installed")
    with pytest.raises(ConfigError, match=r"pip install idistill\[lora\]"):
        finetune(tiny_llama(), None, make_examples(2), FinetuneConfig(max_steps=1, lora_rank=4))


def test_bad_examples_are_rejected_naming_the_sample():
    bad = make_examples(3)
    bad[1]["labels"] = [-100] * len(bad[1]["labels"])
    with pytest.raises(DataError, match="'s1'"):
        finetune(tiny_llama(), None, bad, FinetuneConfig(max_steps=1))
    with pytest.raises(DataError, match="no training examples"):
        finetune(tiny_llama(), None, [], FinetuneConfig(max_steps=1))
    dup = make_examples(2)
    dup[1]["sample_id"] = "s0"
    with pytest.raises(DataError, match="'s0' appears twice"):
        finetune(tiny_llama(), None, dup, FinetuneConfig(max_steps=1))


def test_finetuned_tiny_llama_learns_its_answers_and_reloads_with_its_tokenizer(tmp_path):
    datasets = pytest.importorskip("datasets")
    from idistill_core.data import tokenize_rows
    from idistill_core.evaluate import EvalConfig, evaluate
    from idistill_core.models import load_model

    loaded = load_model("tiny-llama", seed=0)
    questions = [
        ("Tom has 3 apples and buys 5 more. How many apples?", 8),
        ("Sara had 24 cookies and ate 9. How many are left?", 15),
        ("A box holds 6 eggs. How many eggs in 2 boxes?", 12),
        ("Lena has 7 pens and loses 2. How many pens?", 5),
    ]
    rows = [
        {
            "sample_id": f"a{i}",
            "source": "arith",
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": f"The answer is {a}."},
            ],
            "answer": str(a),
        }
        for i, (q, a) in enumerate(questions)
    ]
    examples = tokenize_rows(datasets.Dataset.from_list(rows), loaded.tokenizer, 128).examples
    before = evaluate(loaded.model, loaded.tokenizer, rows, "em-number", EvalConfig(max_new_tokens=16))
    out = tmp_path / "ft"
    config = FinetuneConfig(lr=1e-2, max_steps=60, batch_size=4, precision="fp32")
    result = finetune(loaded.model, loaded.tokenizer, examples, config, out_dir=out)
    assert result.losses[-1] < 0.1 * result.losses[0]

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == loaded.tokenizer.chat_template
    ids = torch.tensor([examples[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded.model.eval()(ids).logits, rtol=0, atol=0)

    after = evaluate(model, tokenizer, rows, "em-number", EvalConfig(max_new_tokens=16))
    assert before.score == 0.0 and after.score == 1.0
    # Labels cover <|im_end|>, so the tuned model ends its turn and generation stops right there.
    assert [p["prediction"] for p in after.predictions] == [f"The answer is {a}." for _, a in questions]
    assert after.details["answer_nll"] < before.details["answer_nll"]
