"""Small on-disk artefacts (gradients, influence, weights, subsets), each published atomically.

Tensors go to safetensors (never pickle), tables to parquet, descriptions to JSON. Every writer builds the
result in a temporary sibling and renames it into place, so a killed run never leaves a half-written file.
A temporary sibling is named after the process that writes it (``.<name>.tmp-<pid>-...``); the next write of
the same target removes those of processes that no longer run (what a SIGKILL leaves behind).
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

from idistill_core.store import faults


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(target: Path) -> None:
    """Temp siblings of ``target`` left by killed processes (never a running writer's)."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        pid = stale.name[len(f".{target.name}.tmp-") :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: str | Path, is_dir: bool = False):
    """Yield a temporary path next to ``target``; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    prefix = f".{target.name}.tmp-{os.getpid()}-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(handle)
        tmp = Path(name)
    try:
        yield tmp
        faults.point("rename.before")
        if is_dir and target.exists():
            old = target.with_name(f".{target.name}.tmp-{os.getpid()}-old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        faults.point("rename.after")
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
    """The arrays and metadata of a ``save_arrays`` file.

    Raises:
        StoreError: one line naming the file when it is missing, not a complete safetensors file (truncated,
            overwritten) or its idistill metadata is not JSON; delete it and re-materialize what wrote it.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    from idistill_core.errors import StoreError

    try:
        with safe_open(str(path), framework="np") as handle:
            header = handle.metadata() or {}
        meta = json.loads(header.get("idistill", "{}"))
        arrays = load_file(str(path))
    except FileNotFoundError:
        raise StoreError(f"{path}: file not found; re-materialize the asset that writes it.") from None
    except (SafetensorError, OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StoreError(
            f"{path}: not a readable idistill safetensors file ({reason}); delete it and re-materialize the "
            "asset that writes it."
        ) from None
    if not isinstance(meta, dict):
        raise StoreError(
            f"{path}: its idistill metadata is a {type(meta).__name__}, not a mapping; delete it and re-materialize "
            "the asset that writes it."
        )
    return arrays, meta


def write_parquet(path: str | Path, table) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_path)`` and publish its file atomically at ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
