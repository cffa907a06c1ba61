"""The idistill CLI end to end on the tiny model: data → select → finetune (from the selection file) → eval."""

import json

import pyarrow.parquet as pq

from idistill_core.cli import main


def test_cli_selects_finetunes_on_the_selection_and_evaluates(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "builtin", "--out", str(data), "--pool-size", "80"]) == 0
    selection = tmp_path / "selection.parquet"
    code = main([
        "select", "--pool", str(data / "pool.jsonl"), "--target", str(data / "targets/arith/dev.jsonl"),
        "--model", "tiny-llama", "--budget", "10", "--landmarks", "20", "--profile", "profiles/tiny.yaml",
        "--out", str(selection),
    ])
    assert code == 0
    table = pq.read_table(selection).to_pydict()
    assert len(table["sample_id"]) == 80 and sum(table["selected"]) == 10
    assert sorted(r for r in table["rank"] if r >= 0) == list(range(10))
    summary = capsys.readouterr().out
    assert "fidelity: Spearman rho" in summary and "stage times" in summary

    checkpoint = tmp_path / "ckpt"
    code = main([
        "finetune", "--train", str(selection), "--pool", str(data / "pool.jsonl"), "--model", "tiny-llama",
        "--out", str(checkpoint), "--steps", "2", "--batch-size", "4", "--precision", "fp32",
    ])
    assert code == 0
    summary_file = json.loads((checkpoint / "train_summary.json").read_text())
    assert summary_file["steps"] == 2
    assert "fine-tuned 10 samples" in capsys.readouterr().out

    scores = tmp_path / "scores.json"
    code = main([
        "eval", "--model", str(checkpoint), "--test", str(data / "targets/arith/test.jsonl"), "--metric", "nll",
        "--limit", "5", "--out", str(scores),
    ])
    assert code == 0
    result = json.loads(scores.read_text())
    assert result["n"] == 5 and result["score"] > 0 and len(result["predictions"]) == 5


def test_cli_bad_budget_is_one_line_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    main(["data", "builtin", "--out", str(data), "--pool-size", "40"])
    out = tmp_path / "selection.parquet"
    code = main([
        "select", "--pool", str(data / "pool.jsonl"), "--target", str(data / "targets/arith/dev.jsonl"),
        "--model", "tiny-llama", "--budget", "500", "--out", str(out),
    ])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("idistill: error")]
    assert len(errors) == 1 and "budget k=500" in errors[0]  # one line (progress bars aside)
    assert not out.exists()
