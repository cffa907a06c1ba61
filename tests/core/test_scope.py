"""Scores, weights and selections cover exactly the pool being selected from, even when the embedding store
is shared with a larger pool (CLI ``--store`` reuse; the assets' one table across pool changes)."""

import pyarrow.parquet as pq
import pytest

from idistill_core.cli import main


def _select(data, pool_file, store, out, *extra):
    return main(
        [
            "select",
            "--pool",
            str(pool_file),
            "--target",
            str(data / "targets/arith/dev.jsonl"),
            "--model",
            "tiny-llama",
            "--budget",
            "10",
            "--landmarks",
            "12",
            "--profile",
            "profiles/tiny.yaml",
            "--store",
            str(store),
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.mark.parametrize("order", ["first", "second"])
def test_cli_selection_on_a_smaller_pool_sharing_the_store_covers_only_that_pool(tmp_path, order):
    data = tmp_path / "data"
    assert main(["data", "builtin", "--out", str(data), "--pool-size", "120"]) == 0
    lines = (data / "pool.jsonl").read_text().splitlines()
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(lines[:40]) + "\n")
    store = tmp_path / "store"
    assert _select(data, data / "pool.jsonl", store, tmp_path / "big.parquet", "--order", order) == 0
    assert _select(data, small, store, tmp_path / "small.parquet", "--order", order) == 0

    small_ids = {__import__("json").loads(line)["sample_id"] for line in lines[:40]}
    table = pq.read_table(tmp_path / "small.parquet").to_pydict()
    assert set(table["sample_id"]) == small_ids and len(table["sample_id"]) == 40
    chosen = {s for s, picked in zip(table["sample_id"], table["selected"]) if picked}
    assert len(chosen) == 10 and chosen <= small_ids
    assert abs(sum(table["weight"]) - 40) < 1e-6 * 40
