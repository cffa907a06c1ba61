"""Fine-tuned checkpoints on disk: written whole or not at all, keyed by what they were trained from.

A checkpoint is a standard Hugging Face folder (``save_pretrained``) plus ``train_summary.json``; it is written into
a temporary sibling and swapped in with ``os.replace`` (:func:`atomic_dir`), so a killed run never leaves a
half-written folder. :func:`data_hash` is the training rows' part of the cache key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

SUMMARY_FILE = "train_summary.json"


def save_checkpoint(
    model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, summary: Mapping | None = None
) -> Path:
    """Write ``model`` (+ tokenizer, + ``train_summary.json``) as a standard HF dir, atomically.

    Everything is written into ``<out_dir>.tmp-<pid>`` first and moved into place with ``os.replace``, so
    ``out_dir`` never holds a half-written checkpoint. An existing ``out_dir`` is moved aside first and
    deleted after the swap.

    Returns:
        ``Path(out_dir)``.
    """
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        write_checkpoint(model, tokenizer, tmp, summary)
    return out


def data_hash(examples: Iterable[Mapping], weights: Mapping[str, float] | None = None) -> str:
    """Order-sensitive hash of tokenized examples (order matters: it seeds which batch each sample is in)."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([str(e["sample_id"]), list(e["input_ids"]), list(e["labels"])]).encode())
        if weights is not None:
            digest.update(repr(float(weights[str(e["sample_id"])])).encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temp dir next to ``out``; on success it replaces ``out`` whole, on error it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(model: torch.nn.Module, tokenizer: Any, folder: Path, summary: Mapping | None) -> None:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if summary is not None:
        (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))


def tied_keys(model: torch.nn.Module) -> set[str]:
    names = set()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        names.add("lm_head.weight")
    return names
