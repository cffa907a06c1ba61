"""The hand-off folder (``idistill_core.export``, docs/handoff.md): another trainer loads and trains on it with
no idistill code, the same rows give the same bytes, ``idistill verify`` accepts a fresh folder and flags a
tampered one, ``idistill select --export`` writes one end to end, and ``--push-to-hub`` sends every file to the
dataset repo (checked up to the request: ``HfApi.create_repo`` / ``create_commit`` are replaced, no network)."""

import functools
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from idistill_core import export
from idistill_core.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export-data")
    assert main(["data", "builtin", "--out", str(folder), "--pool-size", "48"]) == 0
    return folder


def _subset(pool: pa.Table, order: list[int]) -> pa.Table:
    """Six pool rows with scores, weights and ranks, given in the row order ``order`` (ranks follow the rows)."""
    rows = pool.slice(0, 6).select(["sample_id", "source", "messages"]).to_pylist()
    for rank, row in enumerate(rows):
        row.update(score=0.5 - rank / 7, weight=48 / 6, rank=rank)
    return pa.Table.from_pylist([rows[i] for i in order])


def _export(data: Path, out: Path, order=(0, 1, 2, 3, 4, 5)) -> export.ExportResult:
    from idistill_core.data.rows import load_rows

    pool = export.as_arrow(load_rows(str(data / "pool.jsonl")))
    rows = _subset(pool, list(order))
    provenance = {
        "kind": "test",
        "name": "arith",
        "pool": {"id": "builtin", "path": str(data / "pool.jsonl"), "format": "auto", "rows": pool.num_rows,
                 "content_hash": export.pool_hash(pool)},
        "model": {"id": "tiny-llama", "fingerprint": _tiny_fingerprint()},
        "method": {"name": "id", "order": "first"},
        "budget": 6,
        "fidelity_spearman": 0.4321987654,
        "composition": export.composition(export.count_sources(rows), export.count_sources(pool)),
    }
    return export.write_export(out, rows, provenance, {"landmarks": ["a", "b"], "holdout": ["c"]})


@functools.cache
def _tiny_fingerprint() -> str:
    from idistill_core.models.loading import load_model

    return load_model("tiny-llama").fingerprint


def _bytes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


TRAIN_WITHOUT_IDISTILL = textwrap.dedent(
    """
    import sys
    import datasets, transformers, trl

    folder, model_dir, out = sys.argv[1:4]
    rows = datasets.load_dataset("parquet", data_dir=folder, split="train")
    assert rows.num_rows == 6 and "messages" in rows.column_names, rows
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    config = trl.SFTConfig(output_dir=out, max_steps=1, per_device_train_batch_size=2, report_to="none",
                           use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer)
    result = trainer.train()
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("idistill_core", "idistill_assets"))
    assert not leaked, leaked
    print("TRAINED", result.global_step, trainer.state.log_history[0]["loss"])
    """
)


def test_trl_trains_one_step_on_an_exported_folder_with_no_idistill_code(data, tmp_path):
    from idistill_core.models.loading import build_tiny_model

    folder = _export(data, tmp_path / "subset").path
    model_dir = tmp_path / "tiny-llama"
    model, tokenizer = build_tiny_model("tiny-llama")  # only to put weights in a folder; the trainer never sees us
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    script = tmp_path / "train.py"
    script.write_text(TRAIN_WITHOUT_IDISTILL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, str(script), str(folder), str(model_dir), str(tmp_path / "out")],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("TRAINED")]
    assert line and line[0].split()[1] == "1", done.stdout[-2000:]


def test_the_same_rows_export_to_the_same_bytes_whatever_order_they_come_in(data, tmp_path):
    first = _export(data, tmp_path / "one")
    again = _export(data, tmp_path / "one")  # the same folder, replaced
    shuffled = _export(data, tmp_path / "two", order=(3, 5, 0, 2, 1, 4))
    assert first.card_id == again.card_id == shuffled.card_id
    assert _bytes(tmp_path / "one") == _bytes(tmp_path / "two")
    assert sorted(_bytes(tmp_path / "one")) == ["README.md", export.DATA_FILE, export.LANDMARKS]
    card = (tmp_path / "one" / "README.md").read_text()
    assert card.startswith("---\nconfigs:\n- config_name: default\n") and "fidelity ρ (held-out) | 0.4322 |" in card
    assert pq.read_table(tmp_path / "one" / export.DATA_FILE).column("rank").to_pylist() == list(range(6))
    assert not list(tmp_path.glob(".one.tmp-*")), "a temp sibling was left behind"


def _tamper(folder: Path) -> None:
    """Change one assistant message of one row, as a hand edit of the parquet file would."""
    path = folder / export.DATA_FILE
    rows = pq.read_table(path).to_pylist()
    rows[2]["messages"][-1]["content"] += " (edited)"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)


def test_verify_accepts_a_fresh_export_and_flags_a_tampered_one(data, tmp_path, capsys):
    exported = _export(data, tmp_path / "fresh")
    checks = {c.name: c.status for c in export.verify(exported.path)}
    assert checks == {"rows": "ok", "landmarks": "ok", "pool": "ok", "rows in pool": "ok", "model": "ok"}
    assert main(["verify", str(exported.path)]) == 0
    assert "the card matches: 5 ok, 0 mismatch, 0 skipped" in capsys.readouterr().out

    assert main(["verify", str(exported.path), "--model", "tiny-qwen2"]) == 1  # another model: flagged
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines()]
    assert any(ln.startswith("OK       rows:") for ln in lines) and any(ln.startswith("MISMATCH model:") for ln in lines)

    _tamper(exported.path)
    assert main(["verify", str(exported.path)]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH rows:" in out and "MISMATCH rows in pool:" in out and "does NOT match" in out

    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("idistill: error: DataError:") and "nowhere" in err[0], err


def test_cli_select_export_writes_a_loadable_folder_that_verify_accepts(data, tmp_path, capsys):
    import datasets

    folder = tmp_path / "subset"
    code = main([
        "select", "--pool", str(data / "pool.jsonl"), "--target", str(data / "targets/arith/dev.jsonl"),
        "--model", "tiny-llama", "--budget", "8", "--landmarks", "16", "--profile", "profiles/tiny.yaml",
        "--out", str(tmp_path / "selection.parquet"), "--export", str(folder),
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert f"exported {folder} (8 rows with messages" in out
    rows = datasets.load_dataset("parquet", data_dir=str(folder), split="train")
    assert rows.num_rows == 8 and rows.column_names == list(export.COLUMNS)
    assert rows["rank"] == list(range(8)) and all(m[-1]["role"] == "assistant" for m in rows["messages"])
    selection = pq.read_table(tmp_path / "selection.parquet").to_pydict()
    chosen = sorted((r, s) for s, r in zip(selection["sample_id"], selection["rank"], strict=True) if r >= 0)
    assert rows["sample_id"] == [s for _, s in chosen]
    card = export.read_provenance(folder)
    assert card["model"] == {"id": "tiny-llama", "fingerprint": card["model"]["fingerprint"]}
    assert card["method"]["name"] == "id" and card["budget"] == 8 and card["landmarks"]["count"] == 16
    assert card["lance"]["embeddings"]["version"] >= 1 and card["lance"]["coefficients"]["table"].startswith("coeff")
    assert card["recipe"]["num_landmarks"] == 16 and -1 <= card["fidelity_spearman"] <= 1
    assert len(json.loads((folder / export.LANDMARKS).read_text())["landmarks"]) == 16

    assert main(["verify", str(folder)]) == 0
    report = capsys.readouterr().out
    assert "5 ok, 0 mismatch, 0 skipped" in report, report


class _FakeHub:
    """Stands in for ``HfApi.create_repo`` / ``create_commit``: records the requests, sends nothing."""

    def __init__(self):
        self.calls = []

    def create_repo(self, api, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/datasets/{repo_id}"

    def create_commit(self, api, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, {"operations": list(operations), **kwargs}))
        return "https://huggingface.co/datasets/someone/subset/commit/0123"


def test_push_to_hub_commits_every_file_of_the_folder_to_the_dataset_repo(data, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    fake = _FakeHub()
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda api, **kw: fake.create_commit(api, **kw))
    from idistill_core.cli import _push

    exported = _export(data, tmp_path / "subset")
    assert _push(str(exported.path), "someone/subset") == 0
    assert "pushed" in capsys.readouterr().out
    (kind, repo, kwargs), (commit, commit_repo, request) = fake.calls
    assert (kind, repo, kwargs["repo_type"], kwargs["exist_ok"]) == ("create_repo", "someone/subset", "dataset", True)
    assert (commit, commit_repo, request["repo_type"]) == ("create_commit", "someone/subset", "dataset")
    assert request["commit_message"] == f"idistill subset {exported.card_id}"
    sent = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in request["operations"]}
    files = {str(p.relative_to(exported.path)): p.read_bytes() for p in exported.path.rglob("*") if p.is_file()}
    assert sent == files and sorted(sent) == ["README.md", export.DATA_FILE, export.LANDMARKS]


def test_push_to_hub_without_export_is_refused_before_any_work(data, tmp_path, capsys):
    code = main([
        "select", "--pool", str(data / "pool.jsonl"), "--target", str(data / "targets/arith/dev.jsonl"),
        "--model", "tiny-llama", "--budget", "8", "--out", str(tmp_path / "s.parquet"), "--push-to-hub", "a/b",
    ])
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--push-to-hub REPO uploads the --export folder" in err[0]
    assert not (tmp_path / "s.parquet").exists()
