"""Stable content hashes for configs, id sets and files (provenance, cache keys, Dagster data versions)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path


def stable_hash(obj: object, length: int = 12) -> str:
    """First ``length`` hex chars of sha256 over a canonical JSON encoding of ``obj``."""
    payload = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(payload).hexdigest()[:length]


def config_fingerprint(config: object, length: int = 12) -> str:
    """Hash of a (frozen) dataclass config's fields, with its class name so two configs never collide."""
    return stable_hash({"type": type(config).__name__, "fields": dataclasses.asdict(config)}, length)


def ids_hash(sample_ids: Iterable[str], length: int = 16) -> str:
    """Order-independent hash of a set of sample ids."""
    digest = hashlib.sha256()
    for sample_id in sorted(sample_ids):
        digest.update(sample_id.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:length]


def file_hash(path: str | Path, length: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
