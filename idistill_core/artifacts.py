"""Small on-disk artefacts (gradients, influence, weights, subsets), each published atomically.

Tensors go to safetensors (never pickle), tables to parquet, descriptions to JSON. Every writer builds the
result in a temporary sibling and renames it into place, so a killed run never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def atomic_path(target: str | Path, is_dir: bool = False):
    """Yield a temporary path next to ``target``; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(handle)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        if is_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def save_arrays(path: str | Path, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Numpy arrays to one safetensors file; ``metadata`` (JSON-able) is stored in its header."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        save_file(contiguous, str(tmp), metadata={"idistill": json.dumps(metadata or {}, default=str)})


def load_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="np") as handle:
        header = handle.metadata() or {}
    return load_file(str(path)), json.loads(header.get("idistill", "{}"))


def write_parquet(path: str | Path, table) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_path)`` and publish its file atomically at ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
