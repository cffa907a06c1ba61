"""Run the installed ``idistill`` console script in subprocesses on a micro pool (16 samples, tiny Llama)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import REPO

IDISTILL = shutil.which("idistill", path=str(Path(sys.executable).parent)) or "idistill"
POOL = 16
COMMIT_EVERY = 4  # = the embedding batch size, so a resumed run embeds the same batches

MICRO = {
    "home": ".idistill-micro",
    "model": "tiny-llama",
    "targets_dir": "targets",
    "pool": {"source": "builtin", "builtin_size": POOL, "builtin_seed": 0, "include_gsm8k": False},
    "recipe": {
        "num_landmarks": 4,
        "num_holdout": 0,
        "optimizer": "gd",
        "max_length": 192,
        "batch_size": 4,
        "embed": {"num_blocks": 1, "num_tangents": 1, "proj_dim": 16, "batch_size": COMMIT_EVERY},
        "gradients": {"param_subset": "down_proj", "proj_type": "srht", "proj_dim": 64},
    },
}


def micro_data(folder: Path) -> dict[str, Path]:
    """A 16-sample built-in pool, a 2-sample arith dev set and the micro profile."""
    from idistill_core.data.builtin import write_builtin

    write_builtin(folder, pool_size=POOL, seed=0, dev_size=2, test_size=2)
    profile = folder / "micro.yaml"
    profile.write_text(yaml.safe_dump(MICRO))
    return {
        "pool": folder / "pool.jsonl",
        "target": folder / "targets" / "arith" / "dev.jsonl",
        "profile": profile,
    }


def select_argv(data: dict, out: Path, store: Path | None, **flags) -> list[str]:
    args = {
        "--pool": data["pool"],
        "--target": data["target"],
        "--model": "tiny-llama",
        "--budget": 4,
        "--profile": data["profile"],
        "--commit-every": COMMIT_EVERY,
        "--out": out,
    }
    if store is not None:
        args["--store"] = store
    args.update({"--" + k.replace("_", "-"): v for k, v in flags.items()})
    return ["select"] + [str(x) for pair in args.items() for x in pair]


def env(fault: str | None = None) -> dict:
    out = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out.pop("IDISTILL_FAULT", None)
    if fault:
        out["IDISTILL_FAULT"] = fault
    return out


def start(argv: list[str], fault: str | None = None, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [IDISTILL, *argv],
        cwd=cwd or REPO,
        env=env(fault),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(child: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = child.communicate(timeout=timeout)
    return child.returncode, out, err


def run(argv: list[str], fault: str | None = None) -> tuple[int, str, str]:
    return finish(start(argv, fault))


def idistill_lines(stderr: str) -> list[str]:
    """The lines the CLI itself wrote (logging and progress bars share stderr)."""
    return [line for line in stderr.splitlines() if line.startswith("idistill:")]


def assert_one_line(stderr: str, prefix: str) -> str:
    lines = idistill_lines(stderr)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr[-3000:]
    return lines[0]


def table(store: Path) -> dict:
    """{sample_id: float16 vector bytes} of the store's embeddings table, read straight from LanceDB."""
    import lancedb
    import numpy as np

    if not store.exists():
        return {}
    db = lancedb.connect(str(store))
    if "embeddings" not in db.list_tables().tables:
        return {}
    rows = db.open_table("embeddings").to_arrow()
    ids = rows.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)), "an id is in the table twice"
    return {s: np.asarray(v, np.float16).tobytes() for s, v in zip(ids, rows.column("vector").to_pylist())}


def snapshot(folder: Path) -> dict[str, int]:
    """Every file and folder under ``folder`` (relative path -> size; folders -1)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1)
        for p in sorted(folder.rglob("*"))
    }


def dump(rows: list, path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
