"""Issue 6.1 — resume: SIGKILL the shared job mid-way (once in the embeddings, once in the landmark gradients);
re-running finishes the job, recomputes only what was not committed, and ends with the same LanceDB table and
the same landmark gradients as an uninterrupted run."""

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from idistill_assets.resources import current_dir
from idistill_core.project.settings import load_settings
from idistill_core.store import artifacts

from .conftest import COMMIT_EVERY, spawn, tiny_project

pytestmark = pytest.mark.slow

POOL = 96


def run_to_end(profile: Path, progress: Path | None = None) -> None:
    args = ["--profile", str(profile)] + (["--progress", str(progress)] if progress else [])
    child = spawn(args)
    output, _ = child.communicate(timeout=300)
    assert child.returncode == 0, output[-3000:]


def kill_after(profile: Path, progress: Path, prefix: str, commits: int) -> list[str]:
    """Start the shared job, SIGKILL it once ``commits`` chunks starting with ``prefix`` are committed."""
    progress.unlink(missing_ok=True)
    child = spawn(["--profile", str(profile), "--progress", str(progress), "--slow", "0.4"])
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            lines = progress.read_text().splitlines() if progress.exists() else []
            if sum(line.startswith(prefix) for line in lines) >= commits:
                os.kill(child.pid, signal.SIGKILL)
                break
            assert child.poll() is None, (
                f"the job ended before it could be killed:\n{child.stdout.read()[-3000:]}"
            )
            time.sleep(0.05)
        else:
            raise AssertionError("no chunk was committed within 300 s")
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    return progress.read_text().splitlines()


def table_contents(profile: Path) -> tuple[list[str], np.ndarray]:
    """(ids, (n, D) vectors) of the embeddings table, read straight from LanceDB (not through EmbeddingStore)."""
    import lancedb

    settings = load_settings(profile)
    table = lancedb.connect(str(settings.lancedb_uri)).open_table(settings.embeddings_table).to_arrow()
    ids = table.column("sample_id").to_pylist()
    vectors = np.stack([np.asarray(v, dtype=np.float16) for v in table.column("vector").to_pylist()])
    return ids, vectors


def by_id(ids: list[str], vectors: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip(ids, vectors))


def test_killed_embeddings_and_landmark_gradients_resume_to_the_uninterrupted_result(tmp_path):
    reference = tiny_project(tmp_path / "reference", pool_size=POOL)
    run_to_end(reference)
    ref_ids, ref_vectors = table_contents(reference)
    ref_arrays, ref_meta = artifacts.load_arrays(
        current_dir(load_settings(reference), "landmarks") / "landmarks.safetensors"
    )
    assert sorted(ref_ids) == sorted(set(ref_ids)) and len(ref_ids) == POOL

    profile = tiny_project(tmp_path / "killed", pool_size=POOL)
    settings = load_settings(profile)
    progress = tmp_path / "progress.txt"

    # 1. kill during the embeddings: committed chunks survive, nothing else is in the table
    lines = kill_after(profile, progress, "emb", commits=2)
    logged = sum(int(line.split()[1]) for line in lines if line.startswith("emb"))
    ids, vectors = table_contents(profile)
    assert len(ids) == len(set(ids))
    assert (
        logged <= len(ids) <= logged + COMMIT_EVERY < POOL
    )  # at most the one in-flight chunk beyond the log
    reference_rows = by_id(ref_ids, ref_vectors)
    for sample_id, vector in zip(ids, vectors):
        assert np.array_equal(vector, reference_rows[sample_id]), sample_id

    # 2. re-run, killed during the landmark gradients: the embeddings finish, computing only the missing rows
    lines = kill_after(profile, progress, "lm", commits=2)
    inserted = sum(int(line.split()[1]) for line in lines if line.startswith("emb"))
    assert inserted == POOL - len(ids)
    shard_dirs = list((settings.artifacts / "landmarks").glob("shards-*"))
    assert len(shard_dirs) == 1
    kept = {p.name for p in shard_dirs[0].glob("chunk-*.safetensors")}
    assert len(kept) >= 2
    assert not (settings.artifacts / "landmarks" / "current.json").exists()

    # 3. re-run to the end: only the missing gradient chunks are computed
    progress.unlink()
    run_to_end(profile, progress)
    lines = progress.read_text().splitlines()
    assert not [line for line in lines if line.startswith("emb")]  # every embedding was already committed
    recomputed = {line.split()[1] for line in lines if line.startswith("lm")}
    num_chunks = -(-len(ref_meta["landmark_ids"] + ref_meta["holdout_ids"]) // COMMIT_EVERY)
    assert recomputed.isdisjoint(kept) and len(recomputed | kept) == num_chunks
    assert not list((settings.artifacts / "landmarks").glob("shards-*"))  # assembled, then cleaned up

    ids, vectors = table_contents(profile)
    assert len(ids) == len(set(ids)) == POOL
    assert sorted(ids) == sorted(ref_ids)
    rows = by_id(ids, vectors)
    assert all(np.array_equal(rows[s], reference_rows[s]) for s in ref_ids)
    arrays, meta = artifacts.load_arrays(current_dir(settings, "landmarks") / "landmarks.safetensors")
    assert meta == ref_meta
    for name in ("landmarks", "holdout"):
        assert np.array_equal(arrays[name], ref_arrays[name]), name
