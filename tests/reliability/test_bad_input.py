"""Issue 6.2 — bad input gives one clear line and leaves nothing half-written, through the CLI
(`idistill select`: exit status 2, one `idistill: error:` line on stderr, no output file, no new LanceDB rows)
and through the assets (the failed step raises the same one-line error; no parquet, no table rows, no
landmark file or gradient shard is left behind).

Target YAML exists only on the asset side: the CLI takes the dev file itself (`--target`), so the YAML cases
(unknown metric, missing field, k <= 0 in the YAML, a path escaping the data roots) are asset-only.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from idistill_core.cli import main
from idistill_core.data.builtin import write_builtin
from idistill_core.errors import NumericalError
from idistill_core.project.settings import load_settings
from idistill_core.store.lance import EmbeddingStore, StoreIdentity

from .conftest import (
    REPO,
    assert_run_fails_with,
    bad_files,
    edit_profile,
    jsonl,
    run_assets,
    store_rows,
    tiny_project,
)

FILE_CASES = [
    "missing_file",
    "malformed_json_line",
    "wrong_parquet_schema",
    "empty_file",
    "empty_messages",
    "missing_messages",
    "unknown_role",
    "no_assistant_turn",
    "duplicate_sample_id",
    "not_utf8",
    "messages_json_string",
    "empty_assistant_message",
    "chat_or_tulu",
]


# ---------------------------------------------------------------------------------------------------------
# fixtures: small data, saved models (unsupported architecture, NaN weights)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_builtin(folder, pool_size=40, seed=0, dev_size=6, test_size=4)
    pool = folder / "pool.jsonl"
    rows = [json.loads(line) for line in pool.read_text().splitlines()]
    long = {**rows[0], "sample_id": "long_answer"}
    long["messages"] = [
        {"role": "user", "content": "Write a lot."},
        {"role": "assistant", "content": "word " * 400},
    ]
    jsonl(pool, rows + [long])
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Local HF directories (safetensors + tokenizer): a GPT-2 (unsupported) and a tiny Llama with a NaN weight."""
    import torch
    import transformers

    from idistill_core.models.loading import load_model

    folder = tmp_path_factory.mktemp("models")
    tiny = load_model("tiny-llama")
    with torch.no_grad():
        tiny.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    tiny.model.save_pretrained(folder / "nan-llama")
    tiny.tokenizer.save_pretrained(folder / "nan-llama")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=len(tiny.tokenizer), n_positions=256, n_embd=32, n_layer=1, n_head=4
        )
    )
    gpt2.save_pretrained(folder / "gpt2")
    tiny.tokenizer.save_pretrained(folder / "gpt2")
    return folder


def select_args(
    data: Path, tmp_path: Path, *extra: str, pool: Path | None = None, target: Path | None = None
) -> list[str]:
    args = {
        "--pool": str(pool or data / "pool.jsonl"),
        "--target": str(target or data / "targets" / "arith" / "dev.jsonl"),
        "--model": "tiny-llama",
        "--budget": "4",
        "--landmarks": "8",
        "--profile": str(REPO / "profiles" / "tiny.yaml"),
        "--out": str(tmp_path / "selection.parquet"),
        "--store": str(tmp_path / "store"),
    }
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    return ["select"] + [x for pair in args.items() for x in pair]


def cli_error(capsys, args: list[str], tmp_path: Path) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one error line and write no output file."""
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("idistill: error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert not (tmp_path / "selection.parquet").exists()
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# pool and target files
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_pool_file_fails_the_cli_with_one_line_naming_it(case, data, tmp_path, capsys):
    path, error, fragments = bad_files(tmp_path / "bad")[case]
    line = cli_error(capsys, select_args(data, tmp_path, pool=path), tmp_path)
    assert line.startswith(f"idistill: error: {error}: ")
    assert all(f in line for f in fragments), line
    assert store_rows(tmp_path / "store") == 0


@pytest.mark.parametrize("case", ["missing_file", "malformed_json_line", "empty_file", "unknown_role"])
def test_bad_target_file_fails_the_cli_with_one_line_naming_it(case, data, tmp_path, capsys):
    path, error, fragments = bad_files(tmp_path / "bad")[case]
    line = cli_error(capsys, select_args(data, tmp_path, target=path), tmp_path)
    assert line.startswith(f"idistill: error: {error}: ") and all(f in line for f in fragments), line


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_pool_file_fails_the_pool_asset_and_writes_no_parquet(case, tmp_path, instance):
    path, error, fragments = bad_files(tmp_path / "bad")[case]
    profile = tiny_project(tmp_path, pool={"source": str(path)})
    result = run_assets(profile, instance, ["pool"])
    assert_run_fails_with(result, error, *fragments)
    pool_dir = load_settings(profile).artifacts / "pool"
    assert not pool_dir.exists() or not any(pool_dir.iterdir())  # no parquet, no temp file


# ---------------------------------------------------------------------------------------------------------
# sizes: budget, landmarks, max length
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        # k <= 0 and L <= 0 are refused by the option's range (test_bad_options.py), k > N and L > N by the run
        (["--budget", "0"], "UsageError: argument --budget: expected an integer >= 1; got '0'"),
        (["--budget", "42"], "ConfigError: budget k=42 must satisfy 0 < k <= N=41"),
        (["--landmarks", "0"], "UsageError: argument --landmarks: expected an integer >= 1; got '0'"),
        (["--landmarks", "42"], "ConfigError: num_landmarks=42 exceeds the pool size N=41"),
    ],
)
def test_budget_and_landmark_counts_out_of_range_fail_the_cli_before_anything_is_embedded(
    extra, fragment, data, tmp_path, capsys
):
    line = cli_error(capsys, select_args(data, tmp_path, *extra), tmp_path)
    assert line.startswith(f"idistill: error: {fragment}"), line
    assert store_rows(tmp_path / "store") == 0


def test_overlong_sample_is_refused_by_config_naming_it(data, tmp_path, capsys, instance):
    profile = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    profile["recipe"]["on_overflow"] = "error"
    path = tmp_path / "strict.yaml"
    path.write_text(yaml.safe_dump(profile))
    line = cli_error(capsys, select_args(data, tmp_path, "--profile", str(path)), tmp_path)
    assert line.startswith("idistill: error: DataError: ") and "'long_answer'" in line, line
    assert store_rows(tmp_path / "store") == 0

    project = tiny_project(
        tmp_path / "asset", recipe={"on_overflow": "error"}, pool={"source": str(data / "pool.jsonl")}
    )
    result = run_assets(project, instance, ["pool", "embeddings"])
    assert_run_fails_with(result, "DataError", "'long_answer'")
    assert store_rows(load_settings(project).lancedb_uri) == 0


def test_overlong_sample_is_truncated_and_counted_by_default_and_a_table_of_another_model_is_refused(
    data, tmp_path, capsys
):
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.data.rows import load_rows
    from idistill_core.models.loading import load_model

    tokenizer = load_model("tiny-llama").tokenizer
    lengths = tokenize_rows(load_rows(str(data / "pool.jsonl")), tokenizer, 10**6).examples["input_ids"]
    expected = sum(len(ids) > 192 for ids in lengths)  # the tiny profile's max_length
    assert expected >= 1
    assert main(select_args(data, tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"{expected} truncated" in out, out
    rows = store_rows(tmp_path / "store", "embeddings")  # the coefficient table beside it has its own rows
    assert rows == 41

    # the same store with another model: refused, never mixed
    (tmp_path / "selection.parquet").unlink()
    line = cli_error(capsys, select_args(data, tmp_path, "--model", "tiny-qwen2"), tmp_path)
    assert line.startswith("idistill: error: StoreError: ") and "another model or recipe" in line, line
    assert "model_fingerprint=" in line
    assert store_rows(tmp_path / "store", "embeddings") == rows


# ---------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------
def test_unsupported_architecture_and_unknown_model_spec_fail_cli_and_asset(
    models, data, tmp_path, capsys, instance
):
    line = cli_error(capsys, select_args(data, tmp_path, "--model", str(models / "gpt2")), tmp_path)
    assert line.startswith("idistill: error: ModelError: ") and "GPT2LMHeadModel is not supported" in line, (
        line
    )
    missing = tmp_path / "no-such-model"
    line = cli_error(capsys, select_args(data, tmp_path, "--model", str(missing)), tmp_path)
    assert line.startswith("idistill: error: ModelError: ") and f"model spec '{missing}'" in line, line

    profile = tiny_project(tmp_path / "asset", top={"model": str(models / "gpt2")})
    assert_run_fails_with(
        run_assets(profile, instance, ["base_model"]), "ModelError", "GPT2LMHeadModel is not supported"
    )
    edit_profile(profile, model=str(missing))
    assert_run_fails_with(
        run_assets(profile, instance, ["base_model"]), "ModelError", f"model spec '{missing}'"
    )


def test_non_finite_weights_are_detected_and_named_and_nothing_is_written(
    models, data, tmp_path, capsys, instance
):
    line = cli_error(capsys, select_args(data, tmp_path, "--model", str(models / "nan-llama")), tmp_path)
    assert line.startswith("idistill: error: NumericalError: ") and "sample '" in line, line
    assert store_rows(tmp_path / "store") == 0

    profile = tiny_project(tmp_path / "asset", top={"model": str(models / "nan-llama")})
    result = run_assets(profile, instance, ["pool", "warmup", "embeddings", "landmarks"])
    embedding_error = assert_run_fails_with(result, "NumericalError", "sample '")
    steps = {e.step_key for e in result.all_events if e.is_step_failure}
    # landmarks read the embeddings (their input since the coverage strategies), so they do not start after it fails
    assert steps == {"idistill__embeddings"}, steps
    settings = load_settings(profile)
    assert store_rows(settings.lancedb_uri) == 0
    landmarks_dir = settings.artifacts / "landmarks"
    assert not (landmarks_dir / "current.json").exists()
    assert not list(landmarks_dir.rglob("*.safetensors")), list(landmarks_dir.rglob("*"))
    assert embedding_error


def test_store_refuses_non_finite_embeddings_naming_the_sample(tmp_path):
    store = EmbeddingStore.open(tmp_path, "emb", StoreIdentity("m", "r", 3))
    vectors = np.ones((3, 3), np.float32)
    vectors[1, 2] = np.nan
    with pytest.raises(NumericalError, match="embedding of sample 'b' is not finite"):
        store.insert_missing(["a", "b", "c"], vectors)
    vectors[1, 2] = 1e6  # finite in float32, infinite in the float16 column
    with pytest.raises(NumericalError, match="embedding of sample 'b' overflows float16"):
        store.insert_missing(["a", "b", "c"], vectors)
    assert store.count() == 0


@pytest.mark.parametrize("where", ["home_is_a_file", "lancedb_is_a_file", "read_only_home"])
def test_unwritable_home_or_lancedb_folder_fails_the_pool_asset_before_any_work(where, tmp_path, instance):
    if where == "read_only_home" and not Path("/sys/kernel").is_dir():
        pytest.skip("needs Linux sysfs as a read-only folder")
    profile = tiny_project(tmp_path / "project")
    home = {"home_is_a_file": tmp_path / "home", "lancedb_is_a_file": tmp_path / "home2",
            "read_only_home": Path("/sys/kernel/idistill-home")}[where]
    if where == "home_is_a_file":
        home.write_text("x")
    if where == "lancedb_is_a_file":
        home.mkdir()
        (home / "lancedb").write_text("x")
    edit_profile(profile, home=str(home))
    before = sorted(p for p in tmp_path.rglob("*"))
    result = run_assets(profile, instance, ["pool"])
    fragment = {"home_is_a_file": f"{home} is a file, not a folder", "lancedb_is_a_file": "LanceDB folder",
                "read_only_home": "cannot write in /sys/kernel"}[where]
    assert_run_fails_with(result, "OutputError", fragment)
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing created
