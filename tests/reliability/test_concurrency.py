"""Issue 6.3 — concurrency: two target partitions materialized at the same time in two processes (one shared
Dagster instance, LanceDB table and artefact root) both succeed with the outputs of sequential runs, and two
processes writing overlapping ids into one EmbeddingStore end with each id exactly once."""

import json
import shutil
import subprocess
import sys
import textwrap
import time

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch

from idistill_assets.resources import current_dir
from idistill_core.project.settings import load_settings
from idistill_core.store.lance import EmbeddingStore, StoreIdentity
from tests.assets.conftest import dagster_yaml

from .conftest import REPO, run_assets, spawn, tiny_project

pytestmark = pytest.mark.slow

WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import numpy as np
    from idistill_core.store.lance import EmbeddingStore, StoreIdentity

    uri, folder, lo, hi, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    for r in range(rounds):
        while not (folder / f"go-{r}").exists():
            time.sleep(0.002)
        store = EmbeddingStore.open(uri, f"emb{r}", StoreIdentity("model", "recipe", 4))
        for start in range(lo, hi, 3):
            rows = range(start, min(start + 3, hi))
            store.insert_missing([f"s{i:04d}" for i in rows], np.array([[i, i + 1, i + 2, i + 3] for i in rows], np.float32))
        (folder / f"done-{r}-{os.getpid()}").touch()
    """
)
RANGES = ((0, 150), (60, 210), (30, 180))
ROUNDS = 3


def test_processes_writing_overlapping_ids_leave_each_id_exactly_once(tmp_path):
    # Each round, three processes race to create a new table and insert overlapping ids. Without the writer
    # lock this lost rows (a racing create committed as an overwrite) or duplicated ids in about one round of
    # four; three rounds of three writers make such a race very likely to show.
    uri, folder = tmp_path / "lancedb", tmp_path / "sync"
    folder.mkdir()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(uri), str(folder), str(lo), str(hi), str(ROUNDS)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for lo, hi in RANGES
    ]
    deadline = time.monotonic() + 240
    for r in range(ROUNDS):
        (folder / f"go-{r}").touch()
        while len(list(folder.glob(f"done-{r}-*"))) < len(writers):
            assert time.monotonic() < deadline and all(w.poll() in (None, 0) for w in writers), [
                w.communicate()[0][-2000:] for w in writers if w.poll()
            ]
            time.sleep(0.01)
    for writer in writers:
        output, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0, output[-3000:]
    for r in range(ROUNDS):
        store = EmbeddingStore.open(uri, f"emb{r}", StoreIdentity("model", "recipe", 4))
        ids = store.sample_ids()
        assert len(ids) == len(set(ids)) == 210, (r, len(ids), len(set(ids)))
        vectors = store.read([f"s{i:04d}" for i in range(210)])
        assert np.array_equal(vectors[:, 0], np.arange(210, dtype=np.float32))


def test_two_target_partitions_at_once_match_sequential_runs(tmp_path, instance, monkeypatch):
    # the spawned runs take one torch thread (spawn sets OMP_NUM_THREADS=1), and so do the sequential runs here:
    # the comparison is bitwise, and float32 reductions split differently over two threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        _two_partitions_at_once_then_in_sequence(tmp_path, instance)
    finally:
        torch.set_num_threads(threads)


def _two_partitions_at_once_then_in_sequence(tmp_path, instance):
    profile = tiny_project(tmp_path, pool_size=64, targets=("arith", "reading"))
    settings = load_settings(profile)
    dagster_home = tmp_path / "dagster_home"
    dagster_yaml(dagster_home)
    assert run_assets(profile, instance).success  # the shared assets, once, in this process
    # the instance's sqlite storage and the partitions exist before the runs (as under `dagster dev`), so the
    # test exercises our writers, not a race between two first-time schema migrations
    with dg.DagsterInstance.from_config(str(dagster_home)) as shared_instance:
        shared_instance.add_dynamic_partitions("targets", ["arith", "reading"])

    runs = {
        name: spawn(
            [
                "--profile",
                str(profile),
                "--dagster-home",
                str(dagster_home),
                "--job",
                "selection_job",
                "--partition",
                name,
                "--result",
                str(tmp_path / f"{name}.json"),
                "--barrier",
                str(tmp_path / "barrier"),
                "--parties",
                "2",
            ]
        )
        for name in ("arith", "reading")
    }
    for name, run in runs.items():
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, f"{name}:\n{output[-3000:]}"
    spans = [json.loads((tmp_path / f"{name}.json").read_text()) for name in runs]
    assert max(s["started"] for s in spans) < min(s["finished"] for s in spans)  # the two runs overlapped
    concurrent = {}
    for name in runs:
        concurrent[name] = (
            pl.read_parquet(current_dir(settings, "propagated_weights", name) / "propagated_weights.parquet"),
            pl.read_parquet(current_dir(settings, "selected_subset", name) / "subset.parquet"),
        )
        for asset in ("propagated_weights", "selected_subset"):
            shutil.rmtree(settings.artifacts / asset / name)

    store_rows = EmbeddingStore.open(
        settings.lancedb_uri, settings.embeddings_table, _identity_of(settings)
    ).sample_ids()
    assert len(store_rows) == len(set(store_rows)) == 64  # readers never wrote

    for name in runs:  # the same partitions, one after the other, in this process
        assert run_assets(profile, instance, partition=name).success
        weights, subset = concurrent[name]
        again = current_dir(settings, "propagated_weights", name) / "propagated_weights.parquet"
        assert weights.equals(pl.read_parquet(again)), name
        assert subset.equals(pl.read_parquet(current_dir(settings, "selected_subset", name) / "subset.parquet")), name
        assert subset.height == {"arith": 12, "reading": 10}[name]


def _identity_of(settings) -> StoreIdentity:
    import lancedb

    table = lancedb.connect(str(settings.lancedb_uri)).open_table(settings.embeddings_table)
    stored = json.loads(table.schema.metadata[b"idistill"])
    return StoreIdentity(stored["model_fingerprint"], stored["recipe"], stored["dim"])


def test_a_writer_whose_view_is_older_than_another_writers_commit_never_duplicates_ids(tmp_path):
    # The interleaving forced step by step: A opens the table, B commits ids A is about to insert, A inserts
    # from its older view. LanceDB accepts both inserts of a stale-view merge_insert (duplicates, every time);
    # the store refreshes to the latest commit before each write, so A skips B's ids.
    identity = StoreIdentity("model", "recipe", 2)
    first = EmbeddingStore.open(tmp_path, "emb", identity)
    second = EmbeddingStore.open(tmp_path, "emb", identity)
    assert first.version == second.version
    assert second.insert_missing(["x", "y"], np.ones((2, 2), np.float32)) == 2
    assert first.insert_missing(["x", "y", "z"], np.full((3, 2), 2, np.float32)) == 1
    ids = EmbeddingStore.open(tmp_path, "emb", identity).sample_ids()
    assert sorted(ids) == ["x", "y", "z"]
