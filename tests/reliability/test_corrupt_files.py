"""Issue 25 — every file the CLI or the assets open has a parse step: a corrupted file (truncated at any byte,
bytes overwritten anywhere, emptied, replaced by noise) is either still usable or refused with one line naming
it (`idistill: error: <Class>: ...`, exit status 2), with nothing written and an existing store unchanged;
never a traceback.

File kinds: the pool (jsonl, parquet), a target file, the `--profile` YAML, model weights (`model.safetensors`),
tokenizer files (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`), an existing LanceDB
embeddings table, a landmark gradient shard and the propagation coefficient table.

Property-based (hypothesis, a few derandomized examples each). The input-file properties run the CLI in process
up to the point where every input is parsed, loaded and tokenized (`run_selection` is replaced by a sentinel:
reaching it means the corrupted file was still usable); the store properties run the whole micro selection.
"""

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from idistill_core.cli import main
from idistill_core.errors import StoreError
from idistill_core.store import artifacts

from .cli import micro_data, select_argv, snapshot
from .conftest import store_rows

FAST = settings(
    max_examples=8, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Reached(BaseException):
    """Raised in place of run_selection: every input was parsed, loaded and tokenized (a BaseException, so the
    CLI's handlers do not turn it into an error line)."""


# ---------------------------------------------------------------------------------------------------------
# corruption
# ---------------------------------------------------------------------------------------------------------
@st.composite
def corruption(draw):
    """A function bytes -> bytes: truncate, overwrite a run of bytes, empty, noise, or drop a byte."""
    kind = draw(st.sampled_from(["truncate", "overwrite", "empty", "noise", "drop"]))
    where = draw(st.floats(0, 1, exclude_max=True))
    junk = draw(st.binary(min_size=1, max_size=64))

    def apply(data: bytes) -> bytes:
        at = int(where * len(data))
        if kind == "truncate":
            return data[:at]
        if kind == "overwrite":
            return data[:at] + junk + data[at + len(junk):]
        if kind == "empty":
            return b""
        if kind == "noise":
            return junk * 8
        return data[:at] + data[at + 1:]

    apply.description = f"{kind} at {where:.3f} with {junk[:8]!r}"
    return apply


def corrupt(path: Path, damage) -> None:
    path.write_bytes(damage(path.read_bytes()))


def one_error_line(capsys, code) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("idistill:")]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("idistill: error: "), err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The micro pool and profile, a parquet copy of the pool, and a saved tiny-llama folder."""
    from idistill_core.data.rows import load_rows
    from idistill_core.models.loading import load_model

    folder = tmp_path_factory.mktemp("micro")
    data = micro_data(folder)
    load_rows(str(data["pool"])).to_parquet(str(folder / "pool.parquet"))
    tiny = load_model("tiny-llama")
    tiny.model.save_pretrained(folder / "model")
    tiny.tokenizer.save_pretrained(folder / "model")
    return data, folder


def _parse_only(monkeypatch):
    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr("idistill_core.pipeline.run.run_selection", reached)


def _input_case(micro, kind: str, scratch: Path) -> tuple[list[str], Path]:
    """The argv of a run whose ``kind`` input is a copy (in ``scratch``) to corrupt, and that copy."""
    data, folder = micro
    out, store = scratch / "out" / "selection.parquet", scratch / "out" / "store"
    (scratch / "out").mkdir()
    if kind in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        shutil.copytree(folder / "model", scratch / "model")
        return select_argv(data, out, store, model=scratch / "model"), scratch / "model" / kind
    source = {"pool.jsonl": data["pool"], "pool.parquet": folder / "pool.parquet", "target.jsonl": data["target"],
              "profile.yaml": data["profile"]}[kind]
    copy = scratch / source.name
    shutil.copy(source, copy)
    key = {"pool.jsonl": "pool", "pool.parquet": "pool", "target.jsonl": "target", "profile.yaml": "profile"}[kind]
    return select_argv({**data, key: copy}, out, store), copy


INPUTS = ["pool.jsonl", "target.jsonl", "profile.yaml", "model.safetensors", "tokenizer.json",
          "tokenizer_config.json", "chat_template.jinja", "config.json"]


@pytest.mark.parametrize("kind", INPUTS)
@FAST
@given(damage=corruption())
def test_a_corrupted_input_file_is_usable_or_one_line_naming_it(kind, damage, micro, capsys, monkeypatch):
    _parse_only(monkeypatch)
    with tempfile.TemporaryDirectory() as scratch:
        argv, victim = _input_case(micro, kind, Path(scratch))
        corrupt(victim, damage)
        try:
            code = main(argv)
        except Reached:
            event("still usable")
            return  # still a valid file of its kind: the run would go on
        line = one_error_line(capsys, code)
        event("refused")
        # the file itself, or (what transformers refuses past the parse step) the model folder
        assert victim.name in line or f"{victim.parent} " in line, (damage.description, line)
        assert list((Path(scratch) / "out").iterdir()) == [], "a refused run wrote something"


def test_a_parquet_pool_with_a_damaged_page_is_one_line_naming_it(micro, capsys, monkeypatch):
    _parse_only(monkeypatch)
    with tempfile.TemporaryDirectory() as scratch:
        argv, victim = _input_case(micro, "pool.parquet", Path(scratch))
        data = victim.read_bytes()
        at = len(data) // 10  # inside the first column chunk: the footer (schema) still reads
        victim.write_bytes(data[:at] + b"\xff" * 64 + data[at + 64:])
        try:
            line = one_error_line(capsys, main(argv))
        except Exception as error:  # noqa: BLE001 - the traceback this test exists to forbid
            pytest.fail(f"traceback: {type(error).__name__}: {str(error)[:200]}")
    assert "pool.parquet" in line, line


def test_a_truncated_safetensors_file_names_itself_and_the_fix(micro, capsys, monkeypatch):
    _parse_only(monkeypatch)
    with tempfile.TemporaryDirectory() as scratch:
        argv, victim = _input_case(micro, "model.safetensors", Path(scratch))
        victim.write_bytes(victim.read_bytes()[:1000])
        line = one_error_line(capsys, main(argv))
    assert "model.safetensors is not a valid safetensors file" in line and "re-download" in line, line


def test_a_tokenizer_of_another_model_is_refused_before_the_first_forward(micro, capsys, monkeypatch):
    """A tokenizer with more tokens than the embedding has rows would fail mid-run with an IndexError."""
    import json

    _parse_only(monkeypatch)
    with tempfile.TemporaryDirectory() as scratch:
        argv, victim = _input_case(micro, "config.json", Path(scratch))
        config = json.loads(victim.read_text())
        weights = victim.parent / "model.safetensors"
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:400].clone()
        save_file(tensors, weights, metadata={"format": "pt"})
        config.update(vocab_size=400, pad_token_id=0, eos_token_id=1)  # ids transformers checks stay in range
        victim.write_text(json.dumps(config))
        line = one_error_line(capsys, main(argv))
    assert "the tokenizer has 509 tokens but the model's embedding only 400 rows" in line, line


# ---------------------------------------------------------------------------------------------------------
# an existing LanceDB store and its tables
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def filled_store(micro, tmp_path_factory):
    data, _ = micro
    folder = tmp_path_factory.mktemp("filled")
    assert main(select_argv(data, folder / "first.parquet", folder / "store")) == 0
    return folder / "store"


def _table_files(store: Path, table_glob: str) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.glob(f"{table_glob}/**/*") if p.is_file()
                  and "_transactions" not in p.parts and p.name != "latest_version_hint.json")


def _store_case(micro, filled_store, victim_glob: str, damage, capsys) -> tuple[int, str]:
    data, _ = micro
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        shutil.copytree(filled_store, store)
        files = _table_files(store, victim_glob)
        assert files
        for name in files if damage.description.startswith(("truncate", "empty", "noise")) else files[:1]:
            corrupt(store / name, damage)
        before, out = snapshot(store), Path(scratch) / "selection.parquet"
        code = main(select_argv(data, out, store))
        if code == 0:
            return code, ""  # lance did not need the damaged bytes (or they still decode)
        line = one_error_line(capsys, code)
        assert not out.exists()
        assert snapshot(store) == before, "a refused run changed the store"
        return code, line


@settings(FAST, max_examples=5)  # each example is a whole micro selection
@given(damage=corruption())
def test_a_corrupted_embeddings_table_is_one_line_and_left_as_it_was(micro, filled_store, damage, capsys):
    code, line = _store_case(micro, filled_store, "embeddings.lance", damage, capsys)
    event("still usable" if code == 0 else "refused")
    assert code == 0 or ("StoreError: LanceDB table 'embeddings'" in line and "damaged" in line), line


def test_a_truncated_embeddings_data_file_names_the_table_and_the_fix(micro, filled_store, capsys):
    def halve(data: bytes) -> bytes:
        return data[: len(data) // 2]

    halve.description = "truncate half"
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        shutil.copytree(filled_store, store)
        for data_file in store.glob("embeddings.lance/data/*.lance"):
            corrupt(data_file, halve)
        before = snapshot(store)
        line = one_error_line(capsys, main(select_argv(micro[0], Path(scratch) / "s.parquet", store)))
        assert snapshot(store) == before
    assert "LanceDB table 'embeddings'" in line and "damaged" in line and "delete the table" in line, line


def test_a_corrupted_coefficient_table_is_one_line_and_left_as_it_was(micro, filled_store, capsys):
    def halve(data: bytes) -> bytes:
        return data[: len(data) // 2]

    halve.description = "truncate half"
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        shutil.copytree(filled_store, store)
        for data_file in store.glob("coefficients_*.lance/data/*.lance"):
            corrupt(data_file, halve)
        before = snapshot(store)
        try:
            line = one_error_line(capsys, main(select_argv(micro[0], Path(scratch) / "s.parquet", store)))
        except Exception as error:  # noqa: BLE001 - the traceback this test exists to forbid
            pytest.fail(f"traceback: {type(error).__name__}: {error}")
        assert snapshot(store) == before and store_rows(store) >= 0
    assert "coefficients_" in line and "damaged" in line, line


# ---------------------------------------------------------------------------------------------------------
# a landmark gradient shard (and any other artefact written by artifacts.save_arrays)
# ---------------------------------------------------------------------------------------------------------
@FAST
@given(damage=corruption())
def test_a_corrupted_shard_is_readable_or_one_store_error_naming_it(damage, tmp_path_factory):
    import numpy as np

    folder = tmp_path_factory.mktemp("shard")
    shard = folder / "chunk-00000.safetensors"
    grads = np.arange(24, dtype=np.float32).reshape(4, 6)
    artifacts.save_arrays(shard, {"grads": grads}, {"ids": ["a", "b", "c", "d"]})
    corrupt(shard, damage)
    try:
        arrays, meta = artifacts.load_arrays(shard)
    except StoreError as error:
        event("refused")
        message = str(error)
        assert "\n" not in message and str(shard) in message and "re-materialize" in message, message
        return
    assert isinstance(meta, dict) and isinstance(arrays, dict)  # still a complete safetensors file


def test_a_truncated_or_missing_shard_is_one_store_error_naming_it(tmp_path):
    """What the resume path of `pipeline.gradients.compute_gradients` and the landmark readers get."""
    import numpy as np

    shard = tmp_path / "chunk-00000.safetensors"
    artifacts.save_arrays(shard, {"grads": np.ones((2, 3), np.float32)}, {"ids": ["a", "b"]})
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(StoreError, match=r"chunk-00000.safetensors: not a readable idistill safetensors file"):
        artifacts.load_arrays(shard)
    missing = tmp_path / "chunk-00001.safetensors"
    with pytest.raises(StoreError, match="file not found"):
        artifacts.load_arrays(missing)
