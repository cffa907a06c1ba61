"""The row schema and the raw schemas it is converted from.

Every loader returns a disk-backed ``datasets.Dataset`` in the project's row schema::

    {"sample_id": str, "source": str, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

plus the metric columns target rows may carry: ``answer`` (str), ``choices`` (list[str]) and ``answers``
(list[str]). A metric column is kept only when at least one row has it; rows without it hold ``None``.

Raw schemas (``fmt`` values) and how they are converted:

- ``chat``: our own schema. A row without ``sample_id`` gets ``<source>-<sha1(messages)[:12]>`` (sha1 of the
  canonical JSON of ``messages``); a row without ``source`` gets the file's stem. Other fields are dropped.
- ``tulu`` (``allenai/tulu-v2-sft-mixture``: ``dataset, id, messages``): ``sample_id = id``,
  ``source = dataset``.
- ``gsm8k`` (``openai/gsm8k``: ``question, answer``): user = question; assistant = the worked solution with
  the ``<<calc>>`` annotations removed and ``#### N`` replaced by ``The answer is N.`` (the format the built-in
  ``arith`` data uses); ``answer`` = N normalised (no thousands commas, no ``$``).
- ``squad`` (``rajpurkar/squad``: ``id, title, context, question, answers{text, answer_start}``): user =
  passage + question, assistant = the first answer text, ``answers`` = all answer texts.
- ``mmlu`` (``cais/mmlu``: ``question, subject, choices, answer``): user = question + options ``A.``-``D.``,
  assistant = ``The answer is X.``, ``answer`` = the letter, ``choices`` = the option texts.

``fmt="auto"`` picks the schema from the columns and refuses columns that fit two schemas which read a row
differently (chat's ``sample_id``/``source`` next to Tulu V2's ``id``/``dataset``; ``messages`` next to
gsm8k/squad/mmlu columns), naming the option that resolves it: auto-detection never changes a row's identity.
Text must be UTF-8 (a bad byte is named by line, byte column and file offset) and every field has its exact type
(``messages`` a list of ``{role, content}`` strings, not JSON text; ``sample_id`` a string; no empty assistant
message).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import datasets

from idistill_core.errors import DataError

ROLES = ("system", "user", "assistant")

FORMATS = ("auto", "chat", "tulu", "gsm8k", "squad", "mmlu")

METRIC_COLUMNS = ("answer", "choices", "answers")

LETTERS = "ABCD"

FEATURES = datasets.Features(
    {
        "sample_id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "answer": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "answers": datasets.List(datasets.Value("string")),
    }
)

_SCHEMA_COLUMNS = {
    "tulu": ("dataset", "id", "messages"),
    "chat": ("messages",),
    "squad": ("id", "context", "question", "answers"),
    "mmlu": ("question", "choices", "answer"),
    "gsm8k": ("question", "answer"),
}

_AUTO_ORDER = ("tulu", "chat", "squad", "mmlu", "gsm8k")


def derive_sample_id(source: str, messages: list[Mapping[str, str]]) -> str:
    """``<source>-<first 12 hex of sha1(canonical JSON of messages)>``: stable across runs and machines."""
    canonical = [{"role": m["role"], "content": m["content"]} for m in messages]
    payload = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{source}-{hashlib.sha1(payload.encode('utf-8')).hexdigest()[:12]}"


def normalize_number(text: str) -> str | None:
    """Canonical string of one number: no ``$``/commas/spaces, no trailing zeros.

    ``"1,450,000"`` -> ``"1450000"``, ``"$18"`` -> ``"18"``, ``"7.50"`` -> ``"7.5"``, ``"3.0"`` -> ``"3"``,
    ``"-0"`` -> ``"0"``; None when ``text`` is not a number. Shared by the GSM8k converter and the em-number metric.
    """
    cleaned = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))  # also maps "-0" to "0" and "1E+2" forms to plain digits
    return format(value.normalize(), "f")


def _where(origin: str, line: int) -> str:
    return f"{origin}:{line}"


def _check_messages(messages: Any, sample_id: str, where: str) -> list[dict]:
    if isinstance(messages, str):
        raise DataError(
            f"{where}: sample {sample_id!r} field 'messages' is a string (JSON text?), not a list of "
            "{role, content} objects; decode it (json.loads) before writing the file, so that in parquet it is "
            "list<struct<role: string, content: string>>"
        )
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: sample {sample_id!r} has missing or empty 'messages'")
    clean = []
    for turn in messages:
        if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
            raise DataError(f"{where}: sample {sample_id!r} has a message without 'role'/'content': {turn!r}")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise DataError(
                f"{where}: sample {sample_id!r} has unknown role {role!r}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise DataError(f"{where}: sample {sample_id!r} has non-string content for role {role!r}")
        if role == "assistant" and not content.strip():
            raise DataError(
                f"{where}: sample {sample_id!r} has an empty assistant message (turn {len(clean) + 1}); "
                "training on it would only teach the end-of-turn token: fill in the reply or drop the row"
            )
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError(f"{where}: sample {sample_id!r} has no assistant turn")
    return clean


def _convert_chat(raw: Mapping, default_source: str) -> dict:
    source = raw.get("source") or default_source
    row = {"sample_id": raw.get("sample_id"), "source": source, "messages": raw.get("messages")}
    for column in METRIC_COLUMNS:
        if raw.get(column) is not None:
            row[column] = raw[column]
    return row


def _convert_tulu(raw: Mapping, default_source: str) -> dict:
    return {
        "sample_id": raw.get("id"),
        "source": str(raw.get("dataset") or default_source),
        "messages": raw.get("messages"),
    }


_CALC = re.compile(r"<<[^>]*>>")


def _convert_gsm8k(raw: Mapping, default_source: str) -> dict:
    question, solution = raw.get("question"), raw.get("answer")
    if not isinstance(question, str) or not isinstance(solution, str) or "####" not in solution:
        raise DataError("gsm8k row needs string 'question' and 'answer' ending in '#### N'")
    reasoning, final = solution.rsplit("####", 1)
    number = normalize_number(final) or final.strip()
    reasoning = _CALC.sub("", reasoning).strip()
    response = f"{reasoning}\nThe answer is {number}." if reasoning else f"The answer is {number}."
    return {
        "sample_id": raw.get("sample_id"),
        "source": "gsm8k",
        "messages": [
            {"role": "user", "content": question.strip()},
            {"role": "assistant", "content": response},
        ],
        "answer": number,
    }


def squad_prompt(context: str, question: str) -> str:
    """The user prompt for a reading-comprehension row (shared with the built-in ``reading`` source)."""
    return (
        "Read the passage and answer the question with a short span from it.\n\n"
        f"Passage: {context.strip()}\n\nQuestion: {question.strip()}"
    )


def _convert_squad(raw: Mapping, default_source: str) -> dict:
    answers = raw.get("answers") or {}
    texts = list(answers.get("text") or []) if isinstance(answers, Mapping) else list(answers)
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(
            f"squad row {raw.get('id')!r} has no answer text (unanswerable rows are not supported)"
        )
    return {
        "sample_id": raw.get("id"),
        "source": "squad",
        "messages": [
            {"role": "user", "content": squad_prompt(raw["context"], raw["question"])},
            {"role": "assistant", "content": texts[0].strip()},
        ],
        "answers": [t.strip() for t in texts],
    }


def mc_prompt(question: str, choices: list[str]) -> str:
    """The user prompt for a multiple-choice row (shared with the built-in ``mcq`` source)."""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question.strip()}\n\n{options}\n\nAnswer with the letter of the correct option."


def _convert_mmlu(raw: Mapping, default_source: str) -> dict:
    choices, answer = list(raw.get("choices") or []), raw.get("answer")
    if len(choices) != 4:
        raise DataError(f"mmlu row has {len(choices)} choices; expected 4")
    if isinstance(answer, str) and answer in LETTERS:
        letter = answer
    elif isinstance(answer, int) and 0 <= answer < 4:
        letter = LETTERS[answer]
    else:
        raise DataError(f"mmlu row has answer {answer!r}; expected an index 0-3 or a letter A-D")
    return {
        "sample_id": raw.get("sample_id"),
        "source": "mmlu",
        "messages": [
            {"role": "user", "content": mc_prompt(raw["question"], choices)},
            {"role": "assistant", "content": f"The answer is {letter}."},
        ],
        "answer": letter,
        "choices": [str(c) for c in choices],
    }


_CONVERTERS = {
    "chat": _convert_chat,
    "tulu": _convert_tulu,
    "gsm8k": _convert_gsm8k,
    "squad": _convert_squad,
    "mmlu": _convert_mmlu,
}

_IDENTITY = {"chat": ("sample_id", "source"), "tulu": ("id", "dataset")}


def ambiguity(columns: Iterable[str], origin: str, option: str = "fmt") -> str | None:
    """The one-line reason ``columns`` fit more than one schema in different ways, or None."""
    present = set(columns)
    if set(_SCHEMA_COLUMNS["tulu"]) <= present and present & set(_IDENTITY["chat"]):
        chat_fields = ", ".join(sorted(present & set(_IDENTITY["chat"])))
        return (
            f"{origin}: columns fit both chat ({chat_fields}, messages) and Tulu V2 (id, dataset, messages), which "
            f"take the sample id from different fields; pass {option} chat (sample_id from 'sample_id') or "
            f"{option} tulu (sample_id from 'id')"
        )
    if "messages" in present:
        for fmt in ("squad", "mmlu", "gsm8k"):
            if set(_SCHEMA_COLUMNS[fmt]) <= present:
                return (
                    f"{origin}: columns fit both chat (messages) and {fmt} ({', '.join(_SCHEMA_COLUMNS[fmt])}), "
                    f"which build different conversations; pass {option} chat or {option} {fmt}"
                )
    return None


def detect_format(columns: Iterable[str], origin: str = "input", option: str = "fmt") -> str:
    """Name of the raw schema whose identifying columns are all present.

    Raises:
        DataError: no known schema matches, or the columns fit two schemas that read a row differently
            (the message names the ``option`` value that resolves it).
    """
    present = set(columns)
    reason = ambiguity(present, origin, option)
    if reason is not None:
        raise DataError(reason)
    for fmt in _AUTO_ORDER:
        if set(_SCHEMA_COLUMNS[fmt]) <= present:
            return fmt
    if "sample_id" in present:  # our own schema with broken messages: let the row check name the sample
        return "chat"
    raise DataError(
        f"{origin}: cannot detect the schema from columns {sorted(present)}; expected 'messages' "
        f"(chat/tulu), or gsm8k/squad/mmlu columns; pass {option} explicitly"
    )


def convert_row(raw: Mapping, fmt: str, default_source: str = "data") -> dict:
    """Convert one raw row of schema ``fmt`` to our row schema (validated, with a ``sample_id``)."""
    return _finish(_CONVERTERS[fmt](raw, default_source), "row")


def _finish(row: dict, where: str) -> dict:
    sample_id = row.get("sample_id")
    label = str(sample_id) if sample_id is not None else "(no id)"
    for name in ("sample_id", "source"):
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            raise DataError(
                f"{where}: sample {label!r} field {name!r} is {type(value).__name__} ({value!r}), expected a "
                f"string; write it as a string (in parquet: cast the column to string)"
            )
    messages = _check_messages(row.get("messages"), label, where)
    source = str(row.get("source") or "data")
    if sample_id is None or str(sample_id) == "":
        sample_id = derive_sample_id(source, messages)
    out = {"sample_id": str(sample_id), "source": source, "messages": messages}
    out["answer"] = None if row.get("answer") is None else str(row["answer"])
    for column in ("choices", "answers"):
        value = row.get(column)
        if value is not None and not isinstance(value, list):
            raise DataError(f"{where}: sample {sample_id!r} field {column!r} must be a list of strings")
        out[column] = None if value is None else [str(v) for v in value]
    return out
