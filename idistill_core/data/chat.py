"""Chat rendering and tokenisation with assistant-only labels.

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

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import datasets

from idistill_core.data.batch import IGNORE_INDEX
from idistill_core.errors import DataError

logger = logging.getLogger("idistill")


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
