"""Loading, raw-schema conversion and assistant-only label masking (idistill_core.data.rows)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from idistill_core.data.batch import IGNORE_INDEX, iter_batches
from idistill_core.data.chat import encode_conversation, prompt_messages, render_chat, tokenize_rows
from idistill_core.data.formats import normalize_number
from idistill_core.data.rows import load_rows
from idistill_core.errors import DataError

RAW = Path(__file__).resolve().parents[1] / "fixtures" / "raw"

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say the word hi"},
    {"role": "assistant", "content": "hi there"},
    {"role": "user", "content": "And the other one?"},
    {"role": "assistant", "content": "the end\nof it"},
]


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE with a few merges (so pieces can merge across words) and ChatML specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("h", "i"), ("Ġ", "o")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHATML
    return tokenizer


def supervised_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """Decode each maximal run of supervised positions, checking every label token by token."""
    runs, current = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
                current = []
            continue
        assert label == token, "a supervised label must equal the input token at the same position"
        current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat_row(sample_id: str | None, answer: str = "ok", **extra) -> dict:
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}], **extra}
    if sample_id is not None:
        row["sample_id"] = sample_id
    return row


# ---------------------------------------------------------------------------------------------- labels


def test_chatml_labels_are_exactly_assistant_content_plus_im_end_token_by_token():
    tokenizer = make_tokenizer()
    input_ids, labels = encode_conversation(CONVERSATION, tokenizer)

    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert supervised_runs(tokenizer, input_ids, labels) == ["hi there<|im_end|>", "the end\nof it<|im_end|>"]
    # The end marker is one token, and the "\n" after it is not supervised.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i, t in enumerate(input_ids) if t == im_end and labels[i] != IGNORE_INDEX]
    assert all(labels[i + 1] == IGNORE_INDEX for i in ends) and len(ends) == 2


def test_plain_template_without_chat_template_matches_the_documented_format():
    tokenizer = make_tokenizer(chat_template=False)
    text = render_chat(CONVERSATION, tokenizer)
    assert text == (
        "<|system|>\nBe brief.\n<|user|>\nSay the word hi\n<|assistant|>\nhi there<|endoftext|>\n"
        "<|user|>\nAnd the other one?\n<|assistant|>\nthe end\nof it<|endoftext|>\n"
    )
    assert render_chat(CONVERSATION[:2], tokenizer, add_generation_prompt=True).endswith(
        "Say the word hi\n<|assistant|>\n"
    )
    input_ids, labels = encode_conversation(CONVERSATION, tokenizer)
    assert supervised_runs(tokenizer, input_ids, labels) == [
        "hi there<|endoftext|>",
        "the end\nof it<|endoftext|>",
    ]


def test_assistant_text_repeated_in_the_user_turn_is_not_supervised():
    tokenizer = make_tokenizer()
    messages = [{"role": "user", "content": "Reply with: hi"}, {"role": "assistant", "content": "hi"}]
    input_ids, labels = encode_conversation(messages, tokenizer)
    assert supervised_runs(tokenizer, input_ids, labels) == ["hi<|im_end|>"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert first == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_templates_that_inject_a_system_prompt_and_trim_content_still_align():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [
        {"role": "user", "content": "helpful?"},
        {"role": "assistant", "content": "  helpful  "},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "assistant\n"},
    ]
    input_ids, labels = encode_conversation(messages, tokenizer)
    assert (
        input_ids
        == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )
    assert supervised_runs(tokenizer, input_ids, labels) == ["helpful<|im_end|>", "assistant<|im_end|>"]


def test_tokenize_rows_counts_truncation_and_drops_rows_left_without_supervision(tmp_path):
    tokenizer = make_tokenizer()
    rows = [
        {
            "sample_id": "short",
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        },
        {
            "sample_id": "long-prompt",
            "messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}],
        },
        {
            "sample_id": "long-answer",
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "z" * 200}],
        },
    ]
    ds = load_rows(write_jsonl(tmp_path / "pool.jsonl", rows))
    result = tokenize_rows(ds, tokenizer, max_length=40)

    assert result.num_truncated == 2
    assert result.dropped_ids == ["long-prompt"]
    kept = {e["sample_id"]: e for e in result.examples}
    assert set(kept) == {"short", "long-answer"}
    for sample_id, example in kept.items():
        full_ids, full_labels = encode_conversation(
            rows[[r["sample_id"] for r in rows].index(sample_id)]["messages"], tokenizer
        )
        assert example["input_ids"] == full_ids[:40]
        assert example["labels"] == full_labels[:40]
        assert any(label != IGNORE_INDEX for label in example["labels"])
    # The tokenized examples feed the shared batcher unchanged.
    batch = next(iter_batches(result.examples, batch_size=2, pad_token_id=tokenizer.pad_token_id))
    assert batch.labels.shape == batch.input_ids.shape


def test_on_overflow_error_names_the_sample_and_its_length(tmp_path):
    tokenizer = make_tokenizer()
    ds = load_rows(write_jsonl(tmp_path / "p.jsonl", [chat_row("too-long", answer="w" * 100)]))
    length = len(encode_conversation(ds[0]["messages"], tokenizer)[0])
    with pytest.raises(DataError, match=rf"'too-long' has {length} tokens > max_length 16"):
        tokenize_rows(ds, tokenizer, max_length=16, on_overflow="error")


def test_prompt_messages_are_the_turns_before_the_final_assistant():
    row = {"sample_id": "s", "messages": CONVERSATION}
    assert prompt_messages(row) == CONVERSATION[:4]
    with pytest.raises(DataError, match="'s' has no assistant turn"):
        prompt_messages({"sample_id": "s", "messages": CONVERSATION[:2]})


def test_tiny_llama_tokenizer_from_models_masks_labels_token_by_token():
    models_module = pytest.importorskip("idistill_core.models.loading")
    tokenizer = models_module.load_model("tiny-llama").tokenizer
    input_ids, labels = encode_conversation(CONVERSATION, tokenizer)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert supervised_runs(tokenizer, input_ids, labels) == ["hi there<|im_end|>", "the end\nof it<|im_end|>"]


# ------------------------------------------------------------------------------------------ raw schemas


def test_tulu_rows_keep_their_id_and_dataset_as_source():
    ds = load_rows(RAW / "tulu.jsonl")
    raw = [json.loads(line) for line in (RAW / "tulu.jsonl").read_text().splitlines()]
    assert ds.column_names == ["sample_id", "source", "messages"]
    assert ds["sample_id"] == [r["id"] for r in raw]
    assert ds["source"] == [r["dataset"] for r in raw]
    assert list(ds["messages"]) == [r["messages"] for r in raw]


def test_gsm8k_rows_become_worked_answers_ending_in_the_normalised_number():
    ds = load_rows(RAW / "gsm8k.jsonl")
    raw = [json.loads(line) for line in (RAW / "gsm8k.jsonl").read_text().splitlines()]
    assert ds["answer"] == ["18", "3", "2125", "540"]
    for row, source in zip(ds, raw, strict=True):
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": source["question"].strip()}
        assert assistant["role"] == "assistant"
        assert assistant["content"].endswith(f"\nThe answer is {row['answer']}.")
        assert "<<" not in assistant["content"] and "####" not in assistant["content"]
        expected_id = (
            "gsm8k-"
            + hashlib.sha1(
                json.dumps(
                    row["messages"], sort_keys=True, separators=(",", ":"), ensure_ascii=False
                ).encode()
            ).hexdigest()[:12]
        )
        assert row["sample_id"] == expected_id
        assert row["source"] == "gsm8k"


def test_squad_rows_ask_about_the_passage_and_keep_all_answers():
    ds = load_rows(RAW / "squad.jsonl")
    raw = [json.loads(line) for line in (RAW / "squad.jsonl").read_text().splitlines()]
    assert ds["sample_id"] == [r["id"] for r in raw]
    for row, source in zip(ds, raw, strict=True):
        prompt = row["messages"][0]["content"]
        assert source["context"] in prompt and source["question"] in prompt
        assert row["messages"][1] == {"role": "assistant", "content": source["answers"]["text"][0]}
        assert row["answers"] == source["answers"]["text"]


def test_mmlu_rows_list_options_and_answer_with_the_letter():
    ds = load_rows(RAW / "mmlu.jsonl")
    raw = [json.loads(line) for line in (RAW / "mmlu.jsonl").read_text().splitlines()]
    assert ds["answer"] == ["ABCD"[r["answer"]] for r in raw]
    for row, source in zip(ds, raw, strict=True):
        prompt = row["messages"][0]["content"]
        for letter, choice in zip("ABCD", source["choices"]):
            assert f"\n{letter}. {choice}\n" in prompt
        assert row["messages"][1]["content"] == f"The answer is {row['answer']}."
        assert row["choices"] == source["choices"]


@pytest.mark.parametrize("fmt", ["tulu", "gsm8k", "squad", "mmlu"])
def test_auto_detection_matches_the_explicit_format(fmt):
    assert load_rows(RAW / f"{fmt}.jsonl").to_list() == load_rows(RAW / f"{fmt}.jsonl", fmt=fmt).to_list()


def test_parquet_json_and_directory_sources_load_the_same_rows_as_jsonl(tmp_path):
    raw = [json.loads(line) for line in (RAW / "mmlu.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "mmlu.parquet")
    (tmp_path / "mmlu.json").write_text(json.dumps(raw))
    (tmp_path / "target").mkdir()
    write_jsonl(tmp_path / "target" / "dev.jsonl", raw)
    expected = load_rows(RAW / "mmlu.jsonl").to_list()
    assert load_rows(tmp_path / "mmlu.parquet").to_list() == expected
    assert load_rows(tmp_path / "mmlu.json").to_list() == expected
    assert load_rows(tmp_path / "target", split="dev").to_list() == expected
    assert load_rows(RAW / "mmlu.jsonl", limit=2).to_list() == expected[:2]


def test_chat_rows_without_id_get_source_dash_sha1_of_messages(tmp_path):
    row = chat_row(None, answer="fine", source="chitchat", answer_field=None)
    ds = load_rows(write_jsonl(tmp_path / "pool.jsonl", [row, chat_row("given-id", answer="x")]))
    canonical = json.dumps(row["messages"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert ds["sample_id"] == ["chitchat-" + hashlib.sha1(canonical.encode()).hexdigest()[:12], "given-id"]
    assert ds["source"] == ["chitchat", "pool"]  # a row without source takes the file's stem


# ------------------------------------------------------------------------------------------ DataErrors


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        ([chat_row("a"), "{not json"], r"bad\.jsonl:2: malformed JSON line"),
        ([{"sample_id": "m1", "source": "s"}], r"bad\.jsonl:1: sample 'm1' has missing or empty 'messages'"),
        ([{"sample_id": "m2", "messages": []}], r"bad\.jsonl:1: sample 'm2' has missing or empty 'messages'"),
        (
            [chat_row("ok"), {"sample_id": "r1", "messages": [{"role": "robot", "content": "x"}]}],
            r"bad\.jsonl:2: sample 'r1' has unknown role 'robot'",
        ),
        (
            [{"sample_id": "n1", "messages": [{"role": "user", "content": "x"}]}],
            r"bad\.jsonl:1: sample 'n1' has no assistant turn",
        ),
        ([chat_row("d"), chat_row("e"), chat_row("d", answer="2")], r"'d' appears twice \(lines 1 and 3\)"),
        ([], r"bad\.jsonl: empty dataset"),
    ],
    ids=[
        "malformed-line",
        "missing-messages",
        "empty-messages",
        "unknown-role",
        "no-assistant",
        "duplicate-id",
        "empty",
    ],
)
def test_bad_jsonl_raises_a_one_line_data_error(tmp_path, lines, pattern):
    path = write_jsonl(tmp_path / "bad.jsonl", lines) if lines else tmp_path / "bad.jsonl"
    if not lines:
        path.write_text("")
    with pytest.raises(DataError, match=pattern) as info:
        load_rows(path)
    assert "\n" not in str(info.value)


def test_missing_file_raises_naming_the_path(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_rows(tmp_path / "nope.jsonl")


def test_parquet_without_a_schema_column_names_the_column(tmp_path):
    pq.write_table(
        pa.Table.from_pylist([{"question": "q", "answer": 1, "subject": "s"}]), tmp_path / "m.parquet"
    )
    with pytest.raises(DataError, match=r"m\.parquet: parquet schema has no column 'choices'"):
        load_rows(tmp_path / "m.parquet", fmt="mmlu")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,450,000", "1450000"), ("$18", "18"), (" 7.50 ", "7.5"), ("3.0", "3"), ("-4", "-4"), ("12.", "12")],
)
def test_gsm8k_final_numbers_are_normalised(text, expected):
    assert normalize_number(text) == expected


def test_hub_names_go_through_load_dataset_with_the_known_config_and_split(monkeypatch):
    import datasets

    calls = []
    raw = [json.loads(line) for line in (RAW / "mmlu.jsonl").read_text().splitlines()]

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(raw)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_rows("cais/mmlu", limit=3)
    assert calls == [("cais/mmlu", "all", "test")]
    assert ds.to_list() == load_rows(RAW / "mmlu.jsonl", limit=3).to_list()


def test_unreachable_hub_name_raises_a_data_error(monkeypatch):
    import datasets

    def offline(name, config=None, split=None):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError, match=r"someone/some-set: not a local file .*ConnectionError: Couldn't reach"
    ):
        load_rows("someone/some-set")


def test_our_schema_round_trips_through_parquet_with_nested_messages(tmp_path):
    # The row with `answer` goes first: pyarrow infers the parquet schema from the first row.
    rows = [
        {**chat_row("p1", answer="one", source="s"), "answer": "1"},
        chat_row("p2", answer="two", source="s"),
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pool.parquet")
    ds = load_rows(tmp_path / "pool.parquet")
    assert ds.to_list() == load_rows(write_jsonl(tmp_path / "pool.jsonl", rows)).to_list()
    assert ds["answer"] == ["1", None]
    assert ds[1]["messages"] == rows[1]["messages"]


def test_rewriting_a_file_is_never_answered_from_a_stale_cache(tmp_path):
    path = write_jsonl(tmp_path / "pool.jsonl", [chat_row("a")])
    assert load_rows(path)["sample_id"] == ["a"]
    write_jsonl(path, [chat_row("b"), chat_row("c")])
    assert load_rows(path)["sample_id"] == ["b", "c"]
