"""Issue 25 — every command-line option has a range: an out-of-range or wrong-typed value is one line
(`idistill: error: UsageError: argument --X: ...`), exit status 2 and nothing written, never a traceback.

Property-based over the parser itself: every option of every subcommand with a type or a fixed set of choices
is found by walking `build_parser()`, so an option added later is covered without editing this file (and one
added with a bare `type=int`/`float`, i.e. without a range, fails `test_no_option_parses_a_number_without_a_range`).
The CLI runs in process (`idistill_core.cli.main`); `test_installed_console_script_...` runs the three cases of
the issue through the installed `idistill` script.
"""

import argparse
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idistill_core.cli import SEED_MAX, build_parser, main

from .cli import IDISTILL, assert_one_line, env, micro_data, select_argv, snapshot

FAST = settings(
    max_examples=12, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _subcommands(parser: argparse.ArgumentParser, path=()):
    """(subcommand path, parser) of every leaf command: ('select',), ('data', 'builtin'), ..."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _subcommands(sub, (*path, name))
    return found or [(path, parser)]


def _options():
    """(command path, option, action) of every option that takes a typed value or one of fixed choices."""
    return [
        (path, action.option_strings[-1], action)
        for path, parser in _subcommands(build_parser())
        for action in parser._actions
        if action.option_strings and action.nargs != 0 and (action.type is not None or action.choices)
    ]


OPTIONS = _options()
IDS = [f"{' '.join(p)} {o}" for p, o, _ in OPTIONS]

# The ranges of the options the issue names and their neighbours: the documented contract. Discovered options
# must have exactly these ranges (new ones only need a range type; they are covered by the properties below).
EXPECTED = {
    (("data", "builtin"), "--pool-size"): (1, None),
    (("data", "builtin"), "--seed"): (0, SEED_MAX),
    (("select",), "--budget"): (1, None),
    (("select",), "--landmarks"): (1, None),
    (("select",), "--seed"): (0, SEED_MAX),
    (("select",), "--max-length"): (1, None),
    (("select",), "--per-source-cap"): (1, None),
    (("select",), "--commit-every"): (1, None),
    (("select",), "--ray-actors"): (1, None),
    (("finetune",), "--steps"): (1, None),
    (("finetune",), "--batch-size"): (1, None),
    (("finetune",), "--max-length"): (1, None),
    (("finetune",), "--seed"): (0, SEED_MAX),
    (("finetune",), "--grad-accum"): (1, None),
    (("finetune",), "--lora-rank"): (1, None),
    (("eval",), "--limit"): (1, None),
    (("eval",), "--max-new-tokens"): (1, None),
    (("eval",), "--batch-size"): (1, None),
}


def _base_argv(path: tuple, folder: Path) -> list[str]:
    """The command with its required options (paths under ``folder``, which the parser never opens)."""
    required = {
        ("data", "builtin"): ["--out", str(folder / "data")],
        ("select",): ["--pool", str(folder / "pool.jsonl"), "--target", str(folder / "dev.jsonl"), "--budget", "4",
                      "--out", str(folder / "selection.parquet")],
        ("finetune",): ["--train", str(folder / "train.jsonl"), "--out", str(folder / "ft")],
        ("eval",): ["--model", "tiny-llama", "--test", str(folder / "test.jsonl"), "--metric", "nll",
                    "--out", str(folder / "scores.json")],
    }
    return [*path, *required.get(path, [])]


def _refused(capsys, argv: list[str], option: str, folder: Path) -> str:
    """``main(argv)`` exits 2 with exactly one line naming ``option`` on stderr and creates nothing."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err[-2000:]
    assert "Traceback" not in captured.err, captured.err[-2000:]
    assert len(lines) == 1, captured.err[-2000:]
    assert lines[0].startswith(f"idistill: error: UsageError: argument {option}"), lines[0]
    assert "--help" in lines[0], lines[0]  # the fix: where the ranges are listed
    assert list(folder.iterdir()) == [], "a refused option wrote something"
    return lines[0]


def _wrong_typed(action) -> st.SearchStrategy[str]:
    """Text that is not a value of the option's type at all."""
    junk = st.sampled_from(["", " ", "x", "1.5", "1e3", "0x10", "nan", "inf", "-inf", "true", "[1]", "{}", "1,2",
                            "2**4", "١٢", "None", "4 4"])
    words = st.text(min_size=1, max_size=12).filter(lambda t: not t.strip().lstrip("+-").isdigit())
    return junk | words


def _accepts(action, text: str) -> bool:
    try:
        value = action.type(text) if action.type is not None else text
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return False
    return not action.choices or value in action.choices


@pytest.mark.parametrize(("path", "option", "action"), OPTIONS, ids=IDS)
@FAST
@given(data=st.data())
def test_an_out_of_range_or_wrong_typed_option_is_one_line_exit_2_and_nothing_written(
    path, option, action, data, capsys
):
    low, high = getattr(action.type, "low", None), getattr(action.type, "high", None)
    strategies = [_wrong_typed(action)]
    if low is not None:
        strategies.append(st.integers(max_value=low - 1).map(str))
        strategies.append(st.integers(max_value=low - 1).map(lambda v: f"{v}.0"))
    if high is not None:
        strategies.append(st.integers(min_value=high + 1).map(str))
    if getattr(action.type, "positive_float", False):
        strategies.append(st.floats(max_value=0.0).map(repr))
        strategies.append(st.sampled_from(["nan", "inf", "-inf", "0", "-0.0", "1e400"]))
    if getattr(action.type, "weights", False):
        strategies.append(st.lists(st.sampled_from(["1", "0", "-1", "nan", "inf", "", "x"]), min_size=1, max_size=4)
                          .map(",".join))
    if action.choices:
        strategies.append(st.text(max_size=12))
    value = data.draw(st.one_of(strategies).filter(lambda t: not _accepts(action, t) and "\x00" not in t))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        line = _refused(capsys, [*_base_argv(path, folder), f"{option}={value}"], option, folder)
    assert "\n" not in line


@pytest.mark.parametrize(("path", "option", "action"), [o for o in OPTIONS if hasattr(o[2].type, "low")],
                         ids=[i for i, o in zip(IDS, OPTIONS) if hasattr(o[2].type, "low")])
@FAST
@given(data=st.data())
def test_an_in_range_integer_passes_the_parser(path, option, action, data):
    low, high = action.type.low, action.type.high
    value = data.draw(st.integers(min_value=low, max_value=high if high is not None else 2**70))
    assert action.type(str(value)) == value


def test_no_option_parses_a_number_without_a_range():
    """A bare `type=int` / `type=float` accepts -1, 0, nan: every numeric option needs a range type."""
    bare = [f"{' '.join(p)} {o}" for p, o, a in OPTIONS if a.type in (int, float)]
    assert not bare, f"options without a range: {bare} (use cli._int_in / _positive_float)"
    discovered = {(p, o): (a.type.low, a.type.high) for p, o, a in OPTIONS if hasattr(a.type, "low")}
    for key, expected in EXPECTED.items():
        assert discovered.get(key) == expected, (key, discovered.get(key))


def test_finetune_lr_and_target_weights_are_range_checked():
    actions = {(p, o): a for p, o, a in OPTIONS}
    lr, weights = actions[(("finetune",), "--lr")], actions[(("select",), "--target-weights")]
    assert lr.type("3e-4") == pytest.approx(3e-4)
    assert weights.type("2,1,0.5") == "2,1,0.5"
    for bad in ("0", "-1", "nan", "inf"):
        assert not _accepts(lr, bad) and not _accepts(weights, f"1,{bad}")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["select", "--pool", "p"], "the following arguments are required"),
        (["data", "builtin", "--out", "x", "--nope", "1"], "unrecognized arguments: --nope"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required"),
    ],
    ids=["missing-required", "unknown-option", "unknown-command", "no-command"],
)
def test_any_other_usage_error_is_one_line_too(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("idistill: error: UsageError: ") and fragment in lines[0], err


def test_help_still_exits_0(capsys):
    assert main(["select", "--help"]) == 0
    assert "--budget" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# the three cases of the issue, through the installed console script
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    folder = tmp_path_factory.mktemp("micro")
    data = micro_data(folder)
    from idistill_core.models.loading import load_model

    tiny = load_model("tiny-llama")
    model = folder / "truncated-model"
    tiny.model.save_pretrained(model)
    tiny.tokenizer.save_pretrained(model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut in half
    (folder / "broken.yaml").write_text("recipe:\n  seed: [1, 2\n  num_landmarks: 4\n")
    return data, folder


@pytest.mark.parametrize("case", ["negative-seed", "invalid-yaml-profile", "truncated-safetensors"])
def test_installed_console_script_refuses_the_issues_cases_with_one_line(case, micro, tmp_path):
    data, folder = micro
    out, store = tmp_path / "selection.parquet", tmp_path / "store"
    argv = {
        "negative-seed": lambda: select_argv(data, out, store, seed=-1),
        "invalid-yaml-profile": lambda: select_argv({**data, "profile": folder / "broken.yaml"}, out, store),
        "truncated-safetensors": lambda: select_argv(data, out, store, model=folder / "truncated-model"),
    }[case]()
    before = snapshot(tmp_path)
    child = subprocess.run([IDISTILL, *argv], env=env(), capture_output=True, text=True, timeout=240, check=False)
    assert child.returncode == 2, child.stderr[-3000:]
    line = assert_one_line(child.stderr, "idistill: error: ")
    expected = {
        "negative-seed": "argument --seed: expected an integer in [0, 4294967295]; got '-1'",
        "invalid-yaml-profile": "broken.yaml: invalid YAML at line 3, column 16",
        "truncated-safetensors": "model.safetensors is not a valid safetensors file",
    }[case]
    assert expected in line, line
    assert snapshot(tmp_path) == before  # no output, no store folder, no temp file

