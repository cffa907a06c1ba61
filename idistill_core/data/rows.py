"""Pool and target loading, schema conversion and chat tokenisation with assistant-only labels.

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

Tokenisation (``tokenize_rows``) renders each conversation with ``tokenizer.apply_chat_template`` when the
tokenizer has a ``chat_template``. Otherwise it uses this plain template (``{bos}`` is the tokenizer's BOS
token or empty, ``{eos}`` its EOS token or empty)::

    {bos}<|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}{eos}\\n

with ``<|assistant|>\\n`` as the generation prompt. Labels are the token ids of each assistant message's
content plus the one token that follows it (the end-of-turn marker: ``<|im_end|>`` for ChatML, ``{eos}`` for
the plain template) and ``-100`` everywhere else. The text is cut at the assistant-content boundaries and each
piece is tokenised on its own, so labels line up with tokens exactly whatever the tokenizer merges; for
templates whose boundaries sit next to special tokens or newlines (ChatML, the plain template) this gives the
same ids as tokenising the whole text at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import datasets

from idistill_core.data.batch import IGNORE_INDEX
from idistill_core.errors import DataError

logger = logging.getLogger("idistill")

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

# Columns that identify each raw schema, checked in this order by fmt="auto" (tulu before chat: both
# have `messages`, tulu also has `dataset` and `id`).
_SCHEMA_COLUMNS = {
    "tulu": ("dataset", "id", "messages"),
    "chat": ("messages",),
    "squad": ("id", "context", "question", "answers"),
    "mmlu": ("question", "choices", "answer"),
    "gsm8k": ("question", "answer"),
}
_AUTO_ORDER = ("tulu", "chat", "squad", "mmlu", "gsm8k")

# Hub datasets that need a config name, and their default split.
_HUB_DEFAULTS = {
    "openai/gsm8k": ("main", "test"),
    "cais/mmlu": ("all", "test"),
    "rajpurkar/squad": (None, "validation"),
    "allenai/tulu-v2-sft-mixture": (None, "train"),
}
_HUB_FORMATS = {
    "openai/gsm8k": "gsm8k",
    "cais/mmlu": "mmlu",
    "rajpurkar/squad": "squad",
    "allenai/tulu-v2-sft-mixture": "tulu",
}


# --------------------------------------------------------------------------------------------------------
# Row schema helpers


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


def prompt_messages(row: Mapping[str, Any]) -> list[dict]:
    """The messages before the final assistant turn (what a model is asked to continue at eval time).

    Args:
        row: a row in our schema.

    Returns:
        ``messages[:i]`` where ``i`` is the index of the last assistant message.

    Raises:
        DataError: the row has no assistant turn.
    """
    messages = row["messages"]
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return [{"role": m["role"], "content": m["content"]} for m in messages[:i]]
    raise DataError(f"sample {row.get('sample_id')!r} has no assistant turn; cannot build a prompt")


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


# --------------------------------------------------------------------------------------------------------
# Raw schema converters: raw row -> our row (unvalidated messages; _finish validates)


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


# Fields a schema takes a row's identity or content from; a row whose columns fit two schemas that read it
# differently is ambiguous and auto-detection refuses it (it would silently change the row's sample_id or text).
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


# --------------------------------------------------------------------------------------------------------
# Raw readers: yield (line-or-row number, raw dict)


def _not_utf8(path: Path, where: str, err: UnicodeDecodeError, offset: int) -> DataError:
    byte = err.object[err.start]
    return DataError(
        f"{where}: byte 0x{byte:02x} at file offset {offset} is not valid UTF-8; re-save {path.name} as UTF-8 "
        f"(e.g. iconv -f latin1 -t utf-8 {path.name})"
    )


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    offset = 0
    with open(path, "rb") as handle:
        for number, data in enumerate(handle, start=1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as err:
                where = f"{path}:{number}:{err.start + 1}"  # line:column, the column counted in bytes
                raise _not_utf8(path, where, err, offset + err.start) from None
            offset += len(data)
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: malformed JSON line ({err.msg})") from None
            if not isinstance(raw, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(raw).__name__}")
            yield number, raw


def _iter_json(path: Path) -> Iterator[tuple[int, dict]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise _not_utf8(path, f"{path}:{line}:{column}", err, err.start) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
    for number, raw in enumerate(data, start=1):
        if not isinstance(raw, dict):
            raise DataError(f"{path}: row {number} is not a JSON object")
        yield number, raw


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({err})") from None


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:
            raise _parquet_not_utf8(path, batch, number) from None
        for raw in rows:
            number += 1
            yield number, raw


def _parquet_not_utf8(path: Path, batch, before: int) -> DataError:
    """Name the row and column of the first string that is not UTF-8 (parquet does not validate them)."""
    for i in range(batch.num_rows):
        for name in batch.schema.names:
            try:
                batch.column(name).slice(i, 1).to_pylist()
            except UnicodeDecodeError as err:
                return DataError(
                    f"{path} row {before + i + 1} column {name!r}: byte 0x{err.object[err.start]:02x} at "
                    f"offset {err.start} of the value is not valid UTF-8; re-encode that column as UTF-8"
                )
    return DataError(f"{path}: rows {before + 1}-{before + batch.num_rows} hold text that is not valid UTF-8")


# Arrow types a parquet column must have for each schema (checked before any row is read).
def _string(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _messages_type(t) -> bool:
    import pyarrow as pa

    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    fields = {f.name: f.type for f in t.value_type}
    return all(name in fields and _string(fields[name]) for name in ("role", "content"))


_PARQUET_TYPES = {
    "chat": {"sample_id": (_string, "string"), "source": (_string, "string"),
             "messages": (_messages_type, "list<struct<role: string, content: string>>")},
    "tulu": {"id": (_string, "string"), "dataset": (_string, "string"),
             "messages": (_messages_type, "list<struct<role: string, content: string>>")},
    "gsm8k": {"question": (_string, "string"), "answer": (_string, "string")},
    "squad": {"id": (_string, "string"), "context": (_string, "string"), "question": (_string, "string")},
    "mmlu": {"question": (_string, "string")},
}


def _check_parquet_types(path: Path, fmt: str) -> None:
    import pyarrow.parquet as pq

    schema = pq.ParquetFile(path).schema_arrow
    for name, (ok, expected) in _PARQUET_TYPES[fmt].items():
        if name not in schema.names:
            continue
        found = schema.field(name).type
        if ok(found):
            continue
        hint = "cast the column"
        if name == "messages" and _string(found):
            hint = "it holds JSON text: decode it (json.loads) into a list of {role, content} structs"
        raise DataError(
            f"{path}: parquet column {name!r} has type {found}; fmt={fmt!r} needs {expected} ({hint})"
        )


def _first_columns(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_columns(path)
    for _, raw in _iter_jsonl(path) if suffix == ".jsonl" else _iter_json(path):
        return list(raw)
    raise DataError(f"{path}: empty dataset (no rows)")


def _generate_rows(
    path: str, fmt: str, limit: int | None, default_source: str, stamp: str, detected: str | None = None
) -> Iterator[dict]:
    """Generator behind ``Dataset.from_generator``; ``stamp`` (size, mtime) only busts the datasets cache.

    ``detected``: the option name when ``fmt`` was auto-detected from the first row; every later row is then
    checked for the same ambiguity (a jsonl row may carry other fields than the first).
    """
    file = Path(path)
    suffix = file.suffix.lower()
    reader = {".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet}[suffix]
    convert = _CONVERTERS[fmt]
    seen: dict[str, int] = {}
    count = 0
    for number, raw in reader(file):
        if limit is not None and count >= limit:
            break
        where = _where(str(file), number)
        if detected is not None:
            reason = ambiguity(raw, where, detected)
            if reason is not None:
                raise DataError(reason)
        try:
            row = _finish(convert(raw, default_source), where)
        except DataError as err:
            message = str(err)
            raise DataError(message if message.startswith(str(file)) else f"{where}: {message}") from None
        except (KeyError, TypeError) as err:
            raise DataError(f"{where}: {fmt} row is missing or has a malformed field ({err})") from None
        previous = seen.get(row["sample_id"])
        if previous is not None:
            unit = "lines" if suffix == ".jsonl" else "rows"
            raise DataError(
                f"{file}: sample_id {row['sample_id']!r} appears twice ({unit} {previous} and {number}); "
                "ids must be unique"
            )
        seen[row["sample_id"]] = number
        count += 1
        yield row
    if count == 0:
        raise DataError(f"{file}: empty dataset (no rows)")


def _convert_hub_row(raw: dict, index: int, fmt: str, origin: str, default_source: str) -> dict:
    return _finish(_CONVERTERS[fmt](raw, default_source), f"{origin} row {index + 1}")


def _check_unique_ids(ds: datasets.Dataset, origin: str) -> None:
    seen: dict[str, int] = {}
    for number, sample_id in enumerate(ds["sample_id"], start=1):
        if sample_id in seen:
            raise DataError(
                f"{origin}: sample_id {sample_id!r} appears twice (rows {seen[sample_id]} and {number}); "
                "ids must be unique"
            )
        seen[sample_id] = number


def _unwrap(err: Exception) -> Exception:
    """``datasets`` wraps generator exceptions in DatasetGenerationError; surface our DataError instead."""
    cause = err
    while cause is not None:
        if isinstance(cause, DataError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return err


def _drop_empty_metric_columns(ds: datasets.Dataset) -> datasets.Dataset:
    table = ds.data
    empty = [c for c in METRIC_COLUMNS if c in ds.column_names and table.column(c).null_count == len(ds)]
    return ds.remove_columns(empty) if empty else ds


def _resolve_local(path: Path, split: str | None) -> Path:
    if path.is_dir():
        name = split or "train"
        for suffix in (".jsonl", ".parquet", ".json"):
            candidate = path / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
        raise DataError(f"{path}: no {name}.jsonl, {name}.parquet or {name}.json in this directory")
    return path


def load_rows(
    source: str | Path,
    fmt: str = "auto",
    split: str | None = None,
    limit: int | None = None,
    *,
    cache_dir: str | Path | None = None,
    format_option: str = "fmt",
) -> datasets.Dataset:
    """Load pool or target rows in our schema from a local file (or directory) or a hub dataset.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet`` file; a directory holding ``<split>.jsonl`` (or
            ``.parquet``/``.json``); or a hub name such as ``openai/gsm8k`` (optionally ``name:config``),
            loaded with ``datasets.load_dataset`` (needs network).
        fmt: one of ``auto|chat|tulu|gsm8k|squad|mmlu``; ``auto`` detects the schema from the columns.
        split: the split for hub datasets and directories (defaults: the hub dataset's usual eval split,
            ``train`` for directories); ignored for a single file.
        limit: keep only the first ``limit`` rows.
        cache_dir: where ``datasets`` keeps the Arrow files (default: its own cache,
            ``$HF_DATASETS_CACHE``).
        format_option: how the caller spells ``fmt`` (``--pool-format``, ``pool.format``), for messages.

    Returns:
        A disk-backed Dataset with columns ``sample_id, source, messages`` plus the metric columns
        (``answer``, ``choices``, ``answers``) that at least one row carries.

    Raises:
        DataError: missing file, malformed JSON (with line number), a parquet file missing a schema column,
            a byte that is not UTF-8 (line, column and file offset), a parquet column of the wrong type,
            missing/empty messages (or messages stored as a JSON string), an unknown role, no assistant turn, an
            empty assistant message, a non-string ``sample_id``, a duplicate ``sample_id`` (both row numbers),
            columns that fit two schemas with ``fmt="auto"``, or an empty dataset.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown fmt {fmt!r}; expected one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise DataError(f"load_rows limit must be >= 1; got {limit}")
    path = Path(source)
    text = str(source)
    is_hub = (
        not path.exists()
        and path.suffix.lower() not in (".jsonl", ".json", ".parquet")
        and re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", text) is not None
        and not text.startswith((".", "/"))
    )
    try:
        if is_hub:
            ds = _load_hub(text, fmt, split, limit, cache_dir, format_option)
        else:
            ds = _load_local(path, fmt, split, limit, cache_dir, format_option)
    except datasets.exceptions.DatasetGenerationError as err:
        raise _unwrap(err) from None
    return _drop_empty_metric_columns(ds)


def _load_local(
    path: Path, fmt: str, split: str | None, limit: int | None, cache_dir, option: str = "fmt"
) -> datasets.Dataset:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    path = _resolve_local(path, split)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected .jsonl, .json or .parquet")
    detected = None
    if fmt == "auto":
        fmt, detected = detect_format(_first_columns(path), str(path), option), option
    if suffix == ".parquet":
        columns = set(_parquet_columns(path))
        missing = [c for c in _SCHEMA_COLUMNS[fmt] if c not in columns]
        if missing:
            raise DataError(f"{path}: parquet schema has no column {missing[0]!r} needed by fmt={fmt!r}")
        _check_parquet_types(path, fmt)
    stat = path.stat()
    default_source = path.stem if path.stem not in ("train", "dev", "test") else path.parent.name
    logger.info("loading %s rows from %s", fmt, path)
    return datasets.Dataset.from_generator(
        _generate_rows,
        features=FEATURES,
        cache_dir=None if cache_dir is None else str(cache_dir),
        gen_kwargs={
            "path": str(path.resolve()),
            "fmt": fmt,
            "limit": limit,
            "default_source": default_source,
            "stamp": f"{stat.st_size}-{stat.st_mtime_ns}",
            "detected": detected,
        },
    )


def _load_hub(
    text: str, fmt: str, split: str | None, limit: int | None, cache_dir, option: str = "fmt"
) -> datasets.Dataset:
    name, _, config = text.partition(":")
    default_config, default_split = _HUB_DEFAULTS.get(name, (None, "train"))
    split = split or default_split
    origin = f"{name}[{split}]"
    logger.info("loading %s from the hub", origin)
    try:
        extra = {} if cache_dir is None else {"cache_dir": str(cache_dir)}
        raw_ds = datasets.load_dataset(name, config or default_config, split=split, **extra)
    except Exception as err:  # noqa: BLE001 - network, auth, bad name or split: all mean "cannot use it"
        first = (str(err).strip().splitlines() or [""])[0]
        raise DataError(
            f"{name}: not a local file and not loadable from the hub ({type(err).__name__}: {first})"
        ) from None
    if fmt == "auto":
        fmt = _HUB_FORMATS.get(name) or detect_format(raw_ds.column_names, name, option)
    if limit is not None:
        raw_ds = raw_ds.select(range(min(limit, len(raw_ds))))
    if len(raw_ds) == 0:
        raise DataError(f"{origin}: empty dataset (no rows)")
    # map (not a generator) so the Arrow cache is keyed by the hub dataset's own fingerprint.
    ds = raw_ds.map(
        _convert_hub_row,
        with_indices=True,
        fn_kwargs={"fmt": fmt, "origin": origin, "default_source": name.split("/")[-1]},
        remove_columns=raw_ds.column_names,
        features=FEATURES,
        desc=f"convert {fmt}",
    )
    _check_unique_ids(ds, origin)
    return ds


# --------------------------------------------------------------------------------------------------------
# Tokenisation


@dataclass
class TokenizeResult:
    """Tokenized examples plus what was lost on the way.

    Attributes:
        examples: Dataset with columns ``sample_id`` (str), ``input_ids`` (list[int]) and ``labels``
            (list[int], ``-100`` outside assistant content and end-of-turn tokens).
        num_truncated: rows longer than ``max_length`` that were cut (counted before dropping).
        dropped_ids: sample ids left with no supervised token (after truncation), removed from ``examples``.
    """

    examples: datasets.Dataset
    num_truncated: int
    dropped_ids: list[str]


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_plain(messages: list[Mapping[str, str]], tokenizer, add_generation_prompt: bool = False) -> str:
    """The documented plain template (module docstring) for tokenizers without a chat template."""
    bos = getattr(tokenizer, "bos_token", None) or ""
    eos = getattr(tokenizer, "eos_token", None) or ""
    parts = [bos]
    for m in messages:
        end = eos if m["role"] == "assistant" else ""
        parts.append(f"<|{m['role']}|>\n{m['content']}{end}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def render_chat(messages: list[Mapping[str, str]], tokenizer, add_generation_prompt: bool = False) -> str:
    """Render ``messages`` as text with the tokenizer's chat template, or the plain template without one."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not _has_template(tokenizer):
        return render_plain(messages, tokenizer, add_generation_prompt)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(messages: list[Mapping[str, str]], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant message's content.

    The start of assistant turn ``i`` is found by rendering ``messages[:i]`` with the generation prompt;
    when the template is not prefix-stable there, the content is searched for after the previous message.

    Raises:
        DataError: the template's output does not contain an assistant message's content.
    """
    full = render_chat(messages, tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        content = m["content"].strip()
        if m["role"] != "assistant":
            found = full.find(content, cursor) if content else -1
            if found >= 0:
                cursor = found + len(content)
            continue
        start = cursor
        try:
            prefix = render_chat(messages[:i], tokenizer, add_generation_prompt=True)
            if full.startswith(prefix):
                start = max(cursor, len(prefix))
        except Exception as err:  # noqa: BLE001 - some templates reject partial conversations
            logger.debug("prefix render failed (%s); locating assistant turn %d by search", err, i)
        found = full.find(content, start)
        if found < 0:
            raise DataError(f"chat template output does not contain assistant turn {i}'s content")
        spans.append((found, found + len(content)))
        cursor = found + len(content)
    return full, spans


def encode_conversation(messages: list[Mapping[str, str]], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation (labels on assistant content + the next token).

    Returns:
        ``(input_ids, labels)``, two lists of equal length, untruncated.
    """
    text, spans = assistant_spans(messages, tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    supervise_next = False
    for start, end in [*spans, (len(text), len(text))]:
        for piece, supervised in ((text[cursor:start], False), (text[start:end], True)):
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
            if supervised:
                labels.extend(ids)
            else:
                labels.extend([IGNORE_INDEX] * len(ids))
                if supervise_next and ids:
                    # The end-of-turn marker right after assistant content is what teaches the model to stop.
                    labels[len(input_ids)] = ids[0]
            input_ids.extend(ids)
            supervise_next = supervised
        cursor = end
    return input_ids, labels


def _tokenize_one(row: Mapping, tokenizer, max_length: int, on_overflow: str) -> dict:
    try:
        input_ids, labels = encode_conversation(row["messages"], tokenizer)
    except DataError as err:
        raise DataError(f"sample {row['sample_id']!r}: {err}") from None
    length = len(input_ids)
    truncated = length > max_length
    if truncated and on_overflow == "error":
        raise DataError(
            f"sample {row['sample_id']!r} has {length} tokens > max_length {max_length}; "
            "raise max_length or use on_overflow='truncate'"
        )
    labels = labels[:max_length]
    return {
        "sample_id": row["sample_id"],
        "input_ids": input_ids[:max_length],
        "labels": labels,
        "truncated": truncated,
        "num_supervised": sum(1 for t in labels if t != IGNORE_INDEX),
    }


def tokenize_rows(
    ds: datasets.Dataset, tokenizer, max_length: int, on_overflow: str = "truncate"
) -> TokenizeResult:
    """Tokenize rows with assistant-only labels; truncate (or refuse) long rows; drop unsupervised rows.

    Args:
        ds: rows in our schema (``load_rows`` output).
        tokenizer: a Hugging Face tokenizer; its ``chat_template`` is used when set.
        max_length: the most tokens an example keeps.
        on_overflow: ``"truncate"`` keeps the first ``max_length`` tokens; ``"error"`` raises.

    Returns:
        ``TokenizeResult`` whose ``examples`` never contain a row without supervised tokens (such rows
        would give zero or NaN gradients later).

    Raises:
        DataError: ``on_overflow="error"`` and a row is longer than ``max_length`` (names the sample id).
    """
    if max_length < 1:
        raise DataError(f"tokenize_rows max_length must be >= 1; got {max_length}")
    if on_overflow not in ("truncate", "error"):
        raise DataError(f"tokenize_rows on_overflow must be 'truncate' or 'error'; got {on_overflow!r}")
    features = datasets.Features(
        {
            "sample_id": datasets.Value("string"),
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "truncated": datasets.Value("bool"),
            "num_supervised": datasets.Value("int32"),
        }
    )
    tokenized = ds.map(
        _tokenize_one,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "on_overflow": on_overflow},
        batched=False,
        remove_columns=ds.column_names,
        features=features,
        desc="tokenize",
    )
    num_truncated = int(sum(tokenized["truncated"]))
    supervised = tokenized["num_supervised"]
    dropped_ids = [sid for sid, n in zip(tokenized["sample_id"], supervised) if n == 0]
    if dropped_ids:
        logger.warning("dropping %d samples with no supervised token after truncation", len(dropped_ids))
        tokenized = tokenized.filter(lambda n: n > 0, input_columns="num_supervised")
    examples = tokenized.remove_columns(["truncated", "num_supervised"])
    return TokenizeResult(examples=examples, num_truncated=num_truncated, dropped_ids=dropped_ids)
