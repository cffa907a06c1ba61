"""Checks run before any work: output paths writable, enough free disk, inputs readable.

Every check is a probe, not a guess: a folder is writable when a temporary file can be created (and removed)
in it, so permissions, read-only mounts and "the parent is a file" all fail the same way, before the first
model call, and nothing is left behind. Row-level validation of pool and target files is ``data.load_rows``'s
(it reads every row before anything is written).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from idistill_core.errors import OutputError

_MIB = 1024 * 1024


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path):
        path = path.parent
    return path


def _probe(folder: Path, what: str, path: Path) -> None:
    try:
        handle, name = tempfile.mkstemp(prefix=".idistill-probe-", dir=folder)
    except OSError as err:
        raise OutputError(f"{what} {path}: cannot write in {folder} ({err.strerror})") from None
    os.close(handle)
    os.unlink(name)


def _folder_of(path: Path, what: str, target: Path) -> Path:
    """The nearest existing ancestor of ``path``, which must be a folder."""
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise OutputError(f"{what} {target}: {ancestor} is a file, not a folder")
    return ancestor


def check_output_file(path: str | Path, what: str = "output") -> None:
    """``path`` can be (re)written as a file: not a folder, its folder exists or can be made, and is writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; name a file in it (e.g. {path / 'out.parquet'})")
    _probe(_folder_of(path.parent, what, path), what, path)


def check_output_folder(path: str | Path, what: str = "output folder") -> None:
    """``path`` can hold what a run writes: a folder (or creatable), writable, and so is every folder in it.

    Every existing subfolder is probed too (a LanceDB table keeps data, versions and transactions in its
    own folders, any of which may have other permissions than the top)."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    if not path.exists():
        _probe(_folder_of(path, what, path), what, path)
        return
    for root, _dirs, _files in os.walk(path):
        _probe(Path(root), what, path)


@dataclass
class DiskNeed:
    """What a run will write, by folder: ``{folder: {part: bytes}}``."""

    parts: dict[Path, dict[str, int]] = field(default_factory=dict)

    def add(self, folder: str | Path, part: str, nbytes: int) -> None:
        self.parts.setdefault(Path(folder), {})[part] = int(nbytes)


def _mib(nbytes: int) -> str:
    return f"{nbytes / _MIB:.1f} MiB"


def check_free_space(need: DiskNeed) -> None:
    """Every filesystem has room for the parts written to it (folders on one filesystem are summed)."""
    by_device: dict[int, tuple[Path, dict[str, int]]] = {}
    for folder, parts in need.parts.items():
        ancestor = _existing_ancestor(folder)
        device = os.stat(ancestor).st_dev
        anchor, total = by_device.setdefault(device, (ancestor, {}))
        for part, nbytes in parts.items():
            total[part] = total.get(part, 0) + nbytes
    for anchor, parts in by_device.values():
        wanted = sum(parts.values())
        free = shutil.disk_usage(anchor).free
        if wanted > free:
            detail = ", ".join(f"{name} {_mib(n)}" for name, n in parts.items())
            raise OutputError(
                f"{anchor}: the run will write about {_mib(wanted)} ({detail}) but only {_mib(free)} is free; "
                "free some space or write elsewhere"
            )


def embedding_bytes(num_rows: int, dim: int, fingerprint_chars: int = 160) -> int:
    """LanceDB rows: ``N x D x 2`` bytes of float16 vectors plus the id, model and recipe strings per row."""
    return num_rows * (dim * 2 + fingerprint_chars)


def selection_bytes(num_rows: int, id_chars: Iterable[int] = ()) -> int:
    """The selection parquet: id, score, weight, selected, rank and source per row (uncompressed bound)."""
    return sum(id_chars) + num_rows * 48
