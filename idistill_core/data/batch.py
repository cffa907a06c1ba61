"""Padded token batches: the one batch type every compute step (embed, gradients, train, eval) consumes.

A tokenized example is a mapping with ``sample_id`` (str), ``input_ids`` (list[int]) and ``labels``
(list[int], ``-100`` where the token is not supervised). Batches are right-padded; the attention mask
marks real tokens, so "last real token" of row ``b`` is ``attention_mask[b].sum() - 1``.

Length bucketing: real pools mix 20- and 256-token samples, and a batch costs its longest row times its
size, so passes over a pool batch samples in :func:`length_order` (a stable sort by token length over the
whole pass). Results are keyed by ``sample_id``; callers that return rows put them back in their own order.
A stable sort over the whole pass (not per window) keeps resumable passes identical: when a killed pass
committed a prefix of whole batches, the samples still missing sort into exactly the batches the
uninterrupted pass would have formed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from idistill_core.errors import ConfigError

IGNORE_INDEX = -100


@dataclass
class TokenBatch:
    """A right-padded batch. Shapes: ``(B, S)`` long tensors; ``B = len(sample_ids)``."""

    sample_ids: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.sample_ids)

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(
            self.sample_ids,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
        )

    def last_token_index(self) -> torch.Tensor:
        """``(B,)`` index of each row's last real (non-padding) token."""
        return self.attention_mask.sum(dim=1) - 1

    def select(self, rows: list[int]) -> TokenBatch:
        """Rows ``rows`` of this batch, trimmed to their own longest sequence."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        width = int(self.attention_mask[idx].sum(dim=1).max().item())
        return TokenBatch(
            [self.sample_ids[i] for i in rows],
            self.input_ids[idx, :width],
            self.attention_mask[idx, :width],
            self.labels[idx, :width],
        )


def collate(examples: list[Mapping], pad_token_id: int) -> TokenBatch:
    """Right-pad tokenized examples into one ``TokenBatch``."""
    if not examples:
        raise ValueError("collate() got no examples")
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        length = len(e["input_ids"])
        input_ids[row, :length] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.as_tensor(e["labels"], dtype=torch.long)
    return TokenBatch([str(e["sample_id"]) for e in examples], input_ids, attention_mask, labels)


class Batches(Iterator[TokenBatch]):
    """An iterator of batches that also knows how many it yields in all (``len``), so a progress bar over it
    (``tqdm`` reads ``len``) shows done/total and the time left."""

    def __init__(self, stream: Iterator[TokenBatch], total: int):
        self._stream = stream
        self._total = total

    def __next__(self) -> TokenBatch:
        return next(self._stream)

    def __len__(self) -> int:
        return self._total


def iter_batches(
    examples: Iterable[Mapping], batch_size: int, pad_token_id: int, sort_by_length: bool = False
) -> Iterator[TokenBatch]:
    """Stream ``TokenBatch``es of at most ``batch_size`` rows from tokenized examples.

    With ``sort_by_length`` the examples are read fully and grouped by length to cut padding (results
    are keyed by ``sample_id`` so order does not matter to callers); without it memory stays at one batch.
    Examples with a length (a ``datasets.Dataset``, a list) give a :class:`Batches` whose ``len`` is the count.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0; got {batch_size}")
    stream = _batches(examples, batch_size, pad_token_id, sort_by_length)
    if hasattr(examples, "__len__"):
        return Batches(stream, -(-len(examples) // batch_size))
    return stream


def _batches(
    examples: Iterable[Mapping], batch_size: int, pad_token_id: int, sort_by_length: bool
) -> Iterator[TokenBatch]:
    if sort_by_length:
        examples = sorted(examples, key=lambda e: len(e["input_ids"]))
    buffer: list[Mapping] = []
    for example in examples:
        buffer.append(example)
        if len(buffer) == batch_size:
            yield collate(buffer, pad_token_id)
            buffer = []
    if buffer:
        yield collate(buffer, pad_token_id)


def length_order(lengths: Sequence[int]) -> list[int]:
    """Positions sorted by length, ties kept in input order (a stable sort, so deterministic)."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def padding_fraction(lengths: Sequence[int], batch_size: int) -> float:
    """Share of padded positions when ``lengths`` are batched in this order, ``batch_size`` rows at a time."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0; got {batch_size}")
    real = padded = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start : start + batch_size]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1.0 - real / padded if padded else 0.0


# ---------------------------------------------------------------------------------------------------------
# batches of a tokenized ``datasets.Dataset`` (columns sample_id, input_ids, labels)
# ---------------------------------------------------------------------------------------------------------
def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its end-of-sequence id, else 0 (padding is masked either way)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def rows_for(examples, ids: Sequence[str] | None) -> list[int]:
    """Row positions of ``ids`` in ``examples`` (all rows when None); unknown ids are refused, naming them."""
    if ids is None:
        return list(range(len(examples)))
    position = {sample_id: i for i, sample_id in enumerate(examples["sample_id"])}
    missing = [s for s in ids if s not in position]
    if missing:
        raise ConfigError(f"sample ids {missing[:5]} are not in the tokenized pool.")
    return [position[s] for s in ids]


def batches_for(
    examples, tokenizer, batch_size: int, ids: Sequence[str] | None = None, bucket: bool = True
) -> Iterable[TokenBatch]:
    """Batches of the tokenized ``examples`` (optionally only ``ids``).

    With ``bucket`` (default) the rows are batched in :func:`length_order` (shortest first) to cut padding,
    so batches do NOT come in ``ids`` order: key results by ``sample_id`` (see :func:`in_order`). Without it
    they come in ``ids`` (or row) order.
    """
    rows = rows_for(examples, ids)
    if bucket and batch_size > 1:
        lengths = [len(x) for x in examples.select(rows)["input_ids"]]
        rows = [rows[i] for i in length_order(lengths)]
    return iter_batches(examples.select(rows), batch_size, pad_id(tokenizer))


def batch_padding(examples, batch_size: int, ids: Sequence[str] | None = None, bucket: bool = True) -> float:
    """Padding fraction of :func:`batches_for` with the same arguments (the share of wasted positions)."""
    lengths = [len(x) for x in examples.select(rows_for(examples, ids))["input_ids"]]
    if bucket and batch_size > 1:
        lengths = [lengths[i] for i in length_order(lengths)]
    return padding_fraction(lengths, batch_size)


def in_order(wanted: Sequence[str], got: Sequence[str], values):
    """``values`` (rows keyed by ``got``) re-ordered to ``wanted``; numpy arrays and tensors alike."""
    position = {s: i for i, s in enumerate(got)}
    index = [position[s] for s in wanted]
    return values[torch.as_tensor(index)] if torch.is_tensor(values) else np.asarray(values)[index]
