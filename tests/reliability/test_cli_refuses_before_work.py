"""Issue 14 — every bad file, format and output path is refused by the installed `idistill` before any work:
exit status 2, one `idistill: error:` line naming the file, line/row, column or field and sample id, no
traceback, and nothing created (no output, no store folder, no temp or probe file). The cases run as
concurrent subprocesses (one per case: each is a separate refusal of a separate invocation)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from idistill_core.errors import OutputError
from idistill_core.steps.embed import EmbedConfig
from tests.conftest import TINY_HIDDEN

from .cli import MICRO, assert_one_line, dump, finish, micro_data, select_argv, snapshot, start

GOOD = {
    "sample_id": "a",
    "source": "s",
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
}
LATIN1 = (
    b'{"sample_id": "b", "source": "s", "messages": [{"role": "user", "content": "caf\xe9"}, '
    b'{"role": "assistant", "content": "ok"}]}\n'
)
READ_ONLY = Path("/sys/kernel")  # not writable even by root (mode bits are not, for root)


def _cases(folder: Path, data: dict) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (argv, fragments the one error line must contain)."""
    folder.mkdir()
    b = {**GOOD, "sample_id": "b"}
    (folder / "latin1.jsonl").write_bytes((json.dumps(GOOD) + "\n").encode() + LATIN1)
    (folder / "latin1.json").write_bytes(
        b"[\n" + json.dumps(GOOD).encode() + b",\n" + LATIN1.strip() + b"\n]"
    )
    pq.write_table(
        pa.table(
            {
                "sample_id": pa.array([b"a", b"caf\xe9"], pa.binary()).view(pa.string()),
                "messages": [GOOD["messages"]] * 2,
            }
        ),
        folder / "latin1.parquet",
    )
    pq.write_table(
        pa.table({"sample_id": ["a"], "messages": [json.dumps(GOOD["messages"])]}), folder / "strmsg.parquet"
    )
    pq.write_table(pa.table({"sample_id": [1], "messages": [GOOD["messages"]]}), folder / "intid.parquet")
    dump([GOOD, {**b, "messages": json.dumps(GOOD["messages"])}], folder / "strmsg.jsonl")
    dump(
        [GOOD, {**b, "messages": [GOOD["messages"][0], {"role": "assistant", "content": " "}]}],
        folder / "empty.jsonl",
    )
    dump([{**GOOD, "id": "x1", "dataset": "flan"}], folder / "tuluish.jsonl")
    dump([{**GOOD, "question": "2+2?", "answer": "#### 4"}], folder / "qa.jsonl")
    (folder / "a_file").write_text("x")
    (folder / "a_dir").mkdir()
    out, store = folder / "out" / "sel.parquet", folder / "store"

    def select(*, pool=None, target=None, out=out, store=store) -> list[str]:
        argv = select_argv(data, out, store)
        swap = {"--pool": pool, "--target": target}
        return [str(swap.get(argv[i - 1]) or a) if i else a for i, a in enumerate(argv)]

    f = str(folder)
    return {
        "pool_not_utf8_jsonl": (
            select(pool=folder / "latin1.jsonl"),
            ["DataError", "latin1.jsonl:2:", "0xe9", "not valid UTF-8"],
        ),
        "target_not_utf8_json": (
            select(target=folder / "latin1.json"),
            ["DataError", "latin1.json:3:", "0xe9"],
        ),
        "pool_not_utf8_parquet": (
            select(pool=folder / "latin1.parquet"),
            ["DataError", "latin1.parquet row 2 column 'sample_id'", "not valid UTF-8"],
        ),
        "messages_json_string_parquet": (
            select(pool=folder / "strmsg.parquet"),
            ["DataError", "column 'messages' has type string", "json.loads"],
        ),
        "messages_json_string_jsonl": (
            select(target=folder / "strmsg.jsonl"),
            ["DataError", "strmsg.jsonl:2", "sample 'b'", "'messages' is a string"],
        ),
        "sample_id_int_parquet": (
            select(pool=folder / "intid.parquet"),
            ["DataError", "column 'sample_id' has type int64", "needs string"],
        ),
        "empty_assistant_message": (
            select(pool=folder / "empty.jsonl"),
            ["DataError", "empty.jsonl:2", "sample 'b'", "empty assistant message"],
        ),
        "chat_or_tulu_pool": (
            select(pool=folder / "tuluish.jsonl"),
            ["DataError", "tuluish.jsonl", "--pool-format chat", "--pool-format tulu"],
        ),
        "chat_or_gsm8k_pool": (select(pool=folder / "qa.jsonl"), ["DataError", "--pool-format gsm8k"]),
        "out_parent_is_a_file": (
            select(out=folder / "a_file" / "sel.parquet"),
            ["OutputError", "--out", f"{f}/a_file is a file, not a folder"],
        ),
        "out_is_a_folder": (select(out=folder / "a_dir"), ["OutputError", f"--out {f}/a_dir is a folder"]),
        "out_in_read_only_folder": (
            select(out=READ_ONLY / "idistill-h14" / "sel.parquet"),
            ["OutputError", f"cannot write in {READ_ONLY}"],
        ),
        "store_read_only": (
            select(store=READ_ONLY / "idistill-store"),
            ["OutputError", f"cannot write in {READ_ONLY}"],
        ),
        "finetune_out_is_a_file": (
            [
                "finetune",
                "--model",
                "tiny-llama",
                "--train",
                str(data["pool"]),
                "--out",
                str(folder / "a_file"),
            ],
            ["OutputError", "is a file, not a folder"],
        ),
        "finetune_selection_not_parquet": (
            [
                "finetune",
                "--model",
                "tiny-llama",
                "--train",
                str(data["pool"]),
                "--pool",
                str(data["pool"]),
                "--out",
                str(folder / "ft"),
            ],
            ["DataError", "not a readable selection parquet"],
        ),
    }


@pytest.mark.slow
@pytest.mark.skipif(not READ_ONLY.is_dir(), reason="needs Linux sysfs as a read-only folder")
def test_every_bad_input_and_output_path_is_refused_with_one_line_and_nothing_created(tmp_path):
    data = micro_data(tmp_path / "data")
    cases = _cases(tmp_path / "case", data)
    before = snapshot(tmp_path)
    results = {}
    names = list(cases)
    for i in range(0, len(names), 4):  # a few at a time: each process is mostly torch's import
        running = {name: start(cases[name][0], cwd=tmp_path) for name in names[i : i + 4]}
        results.update({name: finish(child) for name, child in running.items()})
    for name, (code, _, err) in results.items():
        error, *fragments = cases[name][1]
        assert code == 2, (name, err[-2000:])
        line = assert_one_line(err, f"idistill: error: {error}: ")
        assert all(fragment in line for fragment in fragments), (name, line)
    assert snapshot(tmp_path) == before  # no output, store, temp or probe file anywhere
    assert not any(READ_ONLY.glob("idistill-*"))


def test_a_disk_too_small_for_the_run_is_refused_with_the_estimate(tmp_path, monkeypatch, capsys):
    """The free-disk check, in process (a full disk cannot be made on demand): the estimate is named."""
    import shutil

    from idistill_core.cli import main
    from idistill_core.project import validate

    data = micro_data(tmp_path / "data")
    real = shutil.disk_usage
    monkeypatch.setattr(validate.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    before = snapshot(tmp_path)
    code = main(select_argv(data, tmp_path / "out" / "sel.parquet", tmp_path / "store"))
    line = assert_one_line(capsys.readouterr().err, "idistill: error: OutputError: ")
    assert code == 2
    # the micro recipe's stored width: its JVP part (proj_dim 16) beside the tiny model's final hidden state
    dim = EmbedConfig(**MICRO["recipe"]["embed"]).output_dim(TINY_HIDDEN)
    assert dim == 16 + 32
    expected = validate.embedding_bytes(16, dim)
    assert f"embeddings 16x{dim}x2 B {expected / 2**20:.1f} MiB" in line and "only 0.0 MiB is free" in line, (
        line
    )
    assert snapshot(tmp_path) == before


def test_check_output_folder_probes_every_folder_of_an_existing_table(tmp_path, monkeypatch):
    """A LanceDB table whose _versions folder cannot be written is refused, naming the store."""
    import tempfile

    from idistill_core.project import validate

    versions = tmp_path / "store" / "embeddings.lance" / "_versions"
    versions.mkdir(parents=True)
    real = tempfile.mkstemp

    def mkstemp(prefix="", dir=None):
        if Path(dir) == versions:
            raise PermissionError(13, "Permission denied")
        return real(prefix=prefix, dir=dir)

    monkeypatch.setattr(validate.tempfile, "mkstemp", mkstemp)
    with pytest.raises(OutputError, match=f"cannot write in {versions}"):
        validate.check_output_folder(tmp_path / "store", "--store")
