"""Behaviour of idistill_core.training.finetune: the loss and update it computes, checkpoints, cache reuse, validation."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import transformers

from idistill_core.errors import ConfigError, DataError
from idistill_core.models.tokenizer import build_tiny_tokenizer
from idistill_core.training.checkpoints import save_checkpoint
from idistill_core.training.finetune import ADAPTER_DIR, FinetuneConfig, finetune
from tests.conftest import tiny_llama as shared_tiny_llama

VOCAB = 64
"""Random example ids are drawn below this; the model's vocab also holds the tokenizer's pad/eos ids."""
TOKENIZER = build_tiny_tokenizer()
F32_EPS = torch.finfo(torch.float32).eps
ADAM_ATOL = 1e-3 * 1e-2
"""Parameter tolerance after AdamW steps at lr 1e-2 (see test_one_step_matches_plain_autograd_adamw_step)."""


def tiny_llama(
    seed: int = 0, dtype: torch.dtype = torch.float32, tied: bool = True
) -> transformers.LlamaForCausalLM:
    model = shared_tiny_llama(
        seed, fork_rng=True, vocab_size=len(TOKENIZER), max_position_embeddings=128, tie_word_embeddings=tied
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
    result = finetune(model, TOKENIZER, examples, config)

    sums, counts = zip(*(per_example_ce_sum(reference, e) for e in examples))
    loss = torch.stack(sums).sum() / sum(counts)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0).step()

    # RMSNorm and rotary run in float32 inside the float64 model: tolerances are float32-eps sized.
    assert result.losses[0] == pytest.approx(loss.item(), rel=50 * F32_EPS)
    assert result.steps == 1 and result.supervised_tokens == sum(counts)
    # TRL's fused LM head takes log-probs in float32, and AdamW's first step is ~lr * sign(g): a component
    # with |g| near float32 eps may move by a visible fraction of lr, so atol is 1e-3 * lr.
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=ADAM_ATOL, msg=name)


def test_trl_path_reaches_the_same_loss_curve_as_the_old_loop():
    """Same seed and recipe, full-batch steps (so data order cannot differ) with accumulation and warm-up:
    the TRL trainer and the hand-written loop (frozen in benchmarks/studies/legacy_finetune_loop.py) log the same
    per-step loss. Tolerance 1e-5 relative: float32 parts of the float64 model give ~1e-7 per step, and
    AdamW's normalisation lets that grow over 8 steps; a wrong normalisation, schedule or clip is >1e-3."""
    from benchmarks.studies import legacy_finetune_loop as legacy

    examples = make_examples(8)
    recipe = {
        "lr": 1e-2,
        "max_steps": 8,
        "batch_size": 4,
        "grad_accum": 2,
        "warmup_ratio": 0.25,
        "max_grad_norm": 0.5,
        "weight_decay": 0.1,
        "precision": "fp32",
    }
    new = finetune(tiny_llama(dtype=torch.float64), TOKENIZER, examples, FinetuneConfig(**recipe))
    old = legacy.finetune(
        tiny_llama(dtype=torch.float64), TOKENIZER, examples, legacy.FinetuneConfig(**recipe)
    )
    assert len(new.losses) == len(old.losses) == 8
    assert new.losses == pytest.approx(old.losses, rel=1e-5)
    assert new.losses[-1] < 0.9 * new.losses[0]  # it really trained
    assert (new.tokens, new.supervised_tokens) == (old.tokens, old.supervised_tokens)


def test_grad_accumulation_normalises_by_tokens_of_the_whole_step():
    # Lengths differ, so a mean of per-micro-batch means would give a different loss and update.
    examples = make_examples(8)
    one = tiny_llama(dtype=torch.float64)
    two = copy.deepcopy(one)
    base = {"lr": 1e-2, "max_steps": 1, "warmup_ratio": 0.0, "precision": "fp32"}
    r1 = finetune(one, TOKENIZER, examples, FinetuneConfig(batch_size=8, grad_accum=1, **base))
    r2 = finetune(two, TOKENIZER, examples, FinetuneConfig(batch_size=2, grad_accum=4, **base))
    assert r1.losses[0] == pytest.approx(r2.losses[0], rel=50 * F32_EPS)
    for p, q in zip(one.parameters(), two.parameters()):
        # summation order differs (4 micro-batches vs 1): AdamW's first step ~ lr * g / (|g| + eps) turns that
        # into up to a few 1e-3 * lr where |g| is near eps (seen 1.4e-3 * lr on an AVX2 CPU)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=5 * ADAM_ATOL)


def test_sample_weights_are_normalised_by_the_weighted_token_count():
    examples = make_examples(6)
    w = [0.0, 2.0, 1.0, 0.5, 3.0, 1.0]
    weights = {e["sample_id"]: x for e, x in zip(examples, w)}
    model = tiny_llama(dtype=torch.float64)
    reference = copy.deepcopy(model)
    # Two micro-batches per step: the normaliser must be the weighted count of the whole step.
    config = FinetuneConfig(max_steps=1, batch_size=3, grad_accum=2, precision="fp32", use_weights=True)
    result = finetune(model, TOKENIZER, examples, config, weights=weights)

    with torch.no_grad():
        sums, counts = zip(*(per_example_ce_sum(reference, e) for e in examples))
    expected = sum(x * s for x, s in zip(w, sums)) / sum(x * n for x, n in zip(w, counts))
    assert result.losses[0] == pytest.approx(float(expected), rel=50 * F32_EPS)

    unweighted = finetune(
        copy.deepcopy(reference),
        TOKENIZER,
        examples,
        FinetuneConfig(max_steps=1, batch_size=6, precision="fp32"),
        weights=weights,
    )
    assert unweighted.losses[0] == pytest.approx(float(sum(sums) / sum(counts)), rel=50 * F32_EPS)


def test_weights_that_all_scale_by_a_constant_change_nothing():
    # Selection weights average N/k (e.g. 12.5), not 1: they must not rescale the loss or the learning rate.
    examples = [dict(e, weight=12.5) for e in make_examples(4)]
    config = FinetuneConfig(lr=1e-2, max_steps=2, batch_size=4, precision="fp32", use_weights=True)
    weighted_model, plain_model = tiny_llama(dtype=torch.float64), tiny_llama(dtype=torch.float64)
    weighted = finetune(weighted_model, TOKENIZER, examples, config)
    plain = finetune(plain_model, TOKENIZER, examples, dataclasses.replace(config, use_weights=False))
    assert weighted.losses == pytest.approx(plain.losses, rel=50 * F32_EPS)
    for p, q in zip(weighted_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=ADAM_ATOL)
    with pytest.raises(DataError, match="'s0'"):
        finetune(tiny_llama(), TOKENIZER, make_examples(4), config)


def test_scaling_every_weight_by_7_changes_neither_the_loss_nor_the_parameters():
    """Σ w_i CE_i / Σ w_i n_i is invariant to w -> 7w; a sum normalised by the plain token count is not, and the
    clip makes that visible in the parameters too: AdamW alone would hide a constant factor on every step."""
    examples = make_examples(6)
    w = [0.5, 2.0, 1.0, 0.25, 3.0, 1.0]
    model = tiny_llama(dtype=torch.float64)
    reference = copy.deepcopy(model)
    sums, counts = zip(*(per_example_ce_sum(reference, e) for e in examples))
    loss = sum(x * s for x, s in zip(w, sums)) / sum(x * n for x, n in zip(w, counts))
    loss.backward()
    grad_norm = float(torch.sqrt(sum((p.grad**2).sum() for p in reference.parameters())))
    # clip above the correct gradient (so it does not act) but far below 7x it (an unnormalised sum is clipped
    # on both steps, which changes AdamW's second step); full-batch steps so data order cannot differ
    config = FinetuneConfig(
        lr=1e-2, max_steps=2, batch_size=3, grad_accum=2, warmup_ratio=0.0, max_grad_norm=3 * grad_norm,
        precision="fp32", use_weights=True,
    )
    runs = {}
    for scale in (1.0, 7.0):
        trained = copy.deepcopy(model)
        weights = {e["sample_id"]: scale * x for e, x in zip(examples, w)}
        runs[scale] = (finetune(trained, TOKENIZER, examples, config, weights=weights), trained)
    (one, one_model), (seven, seven_model) = runs[1.0], runs[7.0]
    # float32 log-probs: an embedding row with |g| near eps moves ~1e-5 either way; the plain-count sum moves
    # parameters by up to 1.5e-3 here (checked by breaking the weighted count in train.py)
    for (name, p), q in zip(seven_model.named_parameters(), one_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=5 * ADAM_ATOL, msg=name)
    assert seven.losses == pytest.approx(one.losses, rel=50 * F32_EPS)
    assert one.losses[0] == pytest.approx(float(loss), rel=50 * F32_EPS)  # the weighted-count loss itself
    assert one.steps == seven.steps == 2


def test_tiny_model_overfits_a_tiny_subset():
    examples = make_examples(8)
    result = finetune(
        tiny_llama(),
        TOKENIZER,
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
        TOKENIZER,
        examples,
        FinetuneConfig(epochs=2, max_steps=None, batch_size=3, grad_accum=2, precision="fp32"),
    )
    # 3 micro-batches per epoch (3+3+1); the trainer accumulates within an epoch -> 2 x ceil(3 / 2).
    assert result.steps == 4 and len(result.losses) == 4
    assert result.supervised_tokens == 2 * supervised
    assert result.tokens == 2 * tokens


def test_bf16_autocast_first_loss_is_close_to_fp32():
    examples = make_examples(8)
    cfg = {"max_steps": 1, "batch_size": 8}
    fp32 = finetune(tiny_llama(), TOKENIZER, examples, FinetuneConfig(precision="fp32", **cfg))
    bf16 = finetune(tiny_llama(), TOKENIZER, examples, FinetuneConfig(precision="bf16-autocast", **cfg))
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], rel=2e-2)
    assert bf16.losses[0] != fp32.losses[0]  # autocast really ran in bf16


def test_gradient_checkpointing_gives_the_same_update():
    examples = make_examples(4)
    plain = tiny_llama(dtype=torch.float64)
    ckpt = copy.deepcopy(plain)
    base = {"lr": 1e-2, "max_steps": 2, "batch_size": 4, "precision": "fp32"}
    finetune(plain, TOKENIZER, examples, FinetuneConfig(**base))
    finetune(ckpt, TOKENIZER, examples, FinetuneConfig(gradient_checkpointing=True, **base))
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=ADAM_ATOL)


def test_saved_tied_checkpoint_reloads_to_identical_logits(tmp_path):
    model = tiny_llama(tied=True)
    out = tmp_path / "ft"
    result = finetune(
        model,
        TOKENIZER,
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
    first = finetune(trained, TOKENIZER, examples, config, out_dir=out)
    mtime = (out / "model.safetensors").stat().st_mtime_ns

    fresh = tiny_llama()  # the same base model, as a new process would load it
    again = finetune(fresh, TOKENIZER, examples, config, out_dir=out)
    assert again.cached and not first.cached
    assert again.losses == first.losses and again.seconds == first.seconds
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    for p, q in zip(fresh.parameters(), trained.parameters()):  # the cached weights were loaded
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    changed = finetune(
        tiny_llama(),
        TOKENIZER,
        examples,
        FinetuneConfig(lr=2e-2, max_steps=3, batch_size=4, precision="fp32"),
        out_dir=out,
    )
    assert not changed.cached and changed.losses != first.losses
    assert json.loads((out / "train_summary.json").read_text())["config"]["lr"] == 2e-2

    other_data = finetune(tiny_llama(), TOKENIZER, make_examples(8, seed=1), config, out_dir=out)
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


def test_lora_trains_and_its_adapter_loads_with_peft(tmp_path):
    import peft

    examples = make_examples(8)
    base = tiny_llama()
    model = copy.deepcopy(base)
    out = tmp_path / "lora"
    config = FinetuneConfig(lr=5e-2, max_steps=30, batch_size=8, precision="fp32", lora_rank=4)
    result = finetune(model, TOKENIZER, examples, config, out_dir=out)
    assert result.losses[-1] < result.losses[0] - 0.1, result.losses  # random targets: a slow but real fall

    ids = torch.tensor([examples[0]["input_ids"]])
    adapted = peft.PeftModel.from_pretrained(copy.deepcopy(base), out / ADAPTER_DIR).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = adapted(ids).logits
        assert not torch.allclose(want, base.eval()(ids).logits)  # the adapter changed the model
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.eval()(ids).logits, want, rtol=1e-4, atol=1e-4)  # merged in place
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_loss_positions_are_those_of_our_tokenisation_and_of_trls_own_assistant_masks():
    """TRL builds its labels from the assistant_masks we hand it: they must carry loss exactly where
    tokenize_rows does, and where TRL's own conversational path (the tiny template has generation markers)
    would put it."""
    import datasets
    import trl

    from idistill_core.data.chat import tokenize_rows
    from idistill_core.training.finetune import _read_examples, sft_dataset

    rows = [
        {
            "sample_id": "a",
            "messages": [
                {"role": "user", "content": "2+3?"},
                {"role": "assistant", "content": "The answer is 5."},
            ],
        },
        {
            "sample_id": "b",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Red, or green."},
            ],
        },
    ]
    ours = tokenize_rows(datasets.Dataset.from_list(rows), TOKENIZER, 192).examples
    args = {"output_dir": "unused", "report_to": "none", "max_length": None, "bf16": False, "use_cpu": True}
    mine = trl.SFTTrainer(
        model=tiny_llama(),
        args=trl.SFTConfig(**args),
        processing_class=copy.deepcopy(TOKENIZER),
        train_dataset=sft_dataset(_read_examples(ours)),
    ).train_dataset
    native = trl.SFTTrainer(
        model=tiny_llama(),
        args=trl.SFTConfig(assistant_only_loss=True, **args),
        processing_class=copy.deepcopy(TOKENIZER),
        train_dataset=datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows]),
    ).train_dataset
    for expected, got, trl_native in zip(ours, mine, native):
        assert got["input_ids"] == trl_native["input_ids"] == list(expected["input_ids"])
        assert got["labels"] == list(expected["labels"])
        assert trl_native["labels"] == list(expected["labels"])


def test_bad_examples_are_rejected_naming_the_sample():
    with pytest.raises(ConfigError, match="tokenizer"):
        finetune(tiny_llama(), None, make_examples(2), FinetuneConfig(max_steps=1))
    shifted = make_examples(2)
    shifted[0]["labels"] = [-100] + shifted[0]["input_ids"][:-1]
    with pytest.raises(DataError, match="'s0'.*neither -100 nor the input id"):
        finetune(tiny_llama(), TOKENIZER, shifted, FinetuneConfig(max_steps=1))
    bad = make_examples(3)
    bad[1]["labels"] = [-100] * len(bad[1]["labels"])
    with pytest.raises(DataError, match="'s1'"):
        finetune(tiny_llama(), TOKENIZER, bad, FinetuneConfig(max_steps=1))
    with pytest.raises(DataError, match="no training examples"):
        finetune(tiny_llama(), TOKENIZER, [], FinetuneConfig(max_steps=1))
    dup = make_examples(2)
    dup[1]["sample_id"] = "s0"
    with pytest.raises(DataError, match="'s0' appears twice"):
        finetune(tiny_llama(), TOKENIZER, dup, FinetuneConfig(max_steps=1))


def test_finetuned_tiny_llama_learns_its_answers_and_reloads_with_its_tokenizer(tmp_path):
    datasets = pytest.importorskip("datasets")
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.models.loading import load_model
    from idistill_core.training.evaluate import EvalConfig, evaluate

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
