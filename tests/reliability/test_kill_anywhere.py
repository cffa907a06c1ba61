"""Issue 14 — kill anywhere: the installed `idistill select` is stopped at every commit and rename point in turn
(SIGKILL through the test-only IDISTILL_FAULT hook, SIGTERM and SIGINT through the same hook), each re-run
resuming the previous one's store; after every stop the table holds each id at most once, only rows equal to an
uninterrupted run's, and the output is absent or complete (never torn). The last run's output equals an
uninterrupted run's. Two uninterrupted runs in fresh processes and stores give identical ids and weights.
"""

import signal

import numpy as np
import polars as pl
import pytest

from .cli import POOL, assert_one_line, finish, micro_data, run, select_argv, start, table

pytestmark = pytest.mark.slow

# (fault, expected exit status, rows in the table after the stop)
CHAIN = [
    ("store.commit.before:2", -signal.SIGKILL, 4),  # killed inside the 2nd commit, before lance writes it
    ("store.commit.after:1:TERM", 128 + signal.SIGTERM, 8),  # SIGTERM right after this run's 1st commit
    ("store.commit.after:1:INT", 128 + signal.SIGINT, 12),  # Ctrl-C right after this run's 1st commit
    ("rename.before:1", -signal.SIGKILL, POOL),  # killed with the output written to its temp file
    ("rename.after:1", -signal.SIGKILL, POOL),  # killed right after the output was published
]


def outputs_equal(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert a["sample_id"].to_list() == b["sample_id"].to_list()
    assert (
        a.filter(pl.col("selected"))["sample_id"].to_list()
        == b.filter(pl.col("selected"))["sample_id"].to_list()
    )
    # a resumed run embeds the same batches, but allow float32 rounding where a kernel path could change
    eps = float(np.finfo(np.float32).eps)
    for column in ("score", "weight"):
        x, y = a[column].to_numpy(), b[column].to_numpy()
        assert np.allclose(x, y, rtol=64 * eps, atol=64 * eps * np.abs(y).max()), column


def test_select_killed_at_every_commit_and_rename_point_resumes_to_the_uninterrupted_result(tmp_path):
    data = micro_data(tmp_path / "data")
    references = [
        start(select_argv(data, tmp_path / f"ref{i}.parquet", tmp_path / f"ref{i}")) for i in (0, 1)
    ]
    for child in references:
        code, _, err = finish(child)
        assert code == 0, err[-3000:]
    reference = pl.read_parquet(tmp_path / "ref0.parquet")
    # cross-process determinism: two fresh processes and stores, identical ids and bitwise-equal weights
    other = pl.read_parquet(tmp_path / "ref1.parquet")
    assert reference["sample_id"].to_list() == other["sample_id"].to_list()
    assert reference["weight"].to_numpy().tobytes() == other["weight"].to_numpy().tobytes()
    assert reference["selected"].to_list() == other["selected"].to_list()
    ref_rows = table(tmp_path / "ref0")
    assert len(ref_rows) == POOL and ref_rows == table(tmp_path / "ref1")

    out, store = tmp_path / "out" / "selection.parquet", tmp_path / "store"
    for fault, status, rows in CHAIN:
        code, _, err = run(select_argv(data, out, store), fault=fault)
        assert code == status, (fault, err[-3000:])
        if status > 0:  # SIGTERM / SIGINT: one line, no traceback, says what is kept
            line = assert_one_line(err, f"idistill: interrupted (SIG{fault.rsplit(':', 1)[1]}); ")
            assert f"{rows} rows committed to {store}, re-run to resume" in line, line
        found = table(store)
        assert len(found) == rows, (fault, len(found))
        assert all(ref_rows[s] == v for s, v in found.items()), fault  # only finished, correct rows
        if out.exists():  # published whole or not at all
            outputs_equal(pl.read_parquet(out), reference)
        assert out.exists() == fault.startswith("rename.after"), fault
        if fault.startswith("rename.before"):
            assert [p.name for p in out.parent.glob(".selection.parquet.tmp-*")], (
                "the temp file is the kill's"
            )

    code, _, err = run(select_argv(data, out, store))
    assert code == 0, err[-3000:]
    assert table(store) == ref_rows
    outputs_equal(pl.read_parquet(out), reference)
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "selection.parquet"
    ]  # killed writers' temps removed


def test_main_job_stopped_by_sigterm_exits_143_with_one_line_and_keeps_committed_rows(tmp_path):
    import subprocess
    import sys

    from idistill_core.project.settings import load_settings

    from .cli import env
    from .conftest import REPO, tiny_project

    profile = tiny_project(tmp_path, pool_size=32)  # commits every 8 rows
    child = subprocess.run(
        [sys.executable, "-m", "idistill_assets.main", "--profile", str(profile), "--targets", "arith"],
        cwd=REPO,
        env=env("store.commit.after:2:TERM"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 128 + signal.SIGTERM, child.stderr[-3000:]
    lines = [line for line in child.stderr.splitlines() if line.startswith("idistill:")]
    assert lines == ["idistill: interrupted (SIGTERM); 16 rows committed, re-run to resume"], child.stderr[
        -3000:
    ]
    # Dagster's own event log prints the interrupted step's stack; the process itself raises nothing uncaught
    assert "Traceback (most recent call last)" not in child.stderr, child.stderr[-3000:]
    uri = load_settings(profile).lancedb_uri
    assert len(table(uri)) == 16  # the two committed chunks, each id once
