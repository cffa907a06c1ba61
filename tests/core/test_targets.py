"""Target registry files: valid specs load; every invalid one is refused with one line naming file and field."""

import pytest
import yaml

from idistill_core.errors import ConfigError
from idistill_core.project.targets import load_target_spec


def _write(tmp_path, **fields):
    spec = {"name": "arith", "metric": "em-number", "dev": "t/dev.jsonl", "test": "t/test.jsonl", "budget": 5}
    spec.update(fields)
    spec = {k: v for k, v in spec.items() if v is not None}
    path = tmp_path / "arith.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_valid_spec_resolves_paths_inside_the_data_root(tmp_path):
    spec = load_target_spec(_write(tmp_path), [tmp_path])
    assert spec.dev == (tmp_path / "t" / "dev.jsonl").resolve()
    assert spec.method == "id" and spec.finetune is True


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"metric": "bleu"}, "field 'metric' = 'bleu' is unknown"),
        ({"budget": None}, "missing required field"),
        ({"budget": 0}, "field 'budget' must be a positive integer"),
        ({"dev": "../../etc/passwd"}, "field 'dev' = '../../etc/passwd' escapes the data roots"),
        ({"test": "/etc/passwd"}, "field 'test' = '/etc/passwd' escapes the data roots"),
        ({"method": "magic"}, "field 'method' = 'magic' is unknown"),
        ({"colour": "red"}, "unknown field"),
        ({"name": "other"}, "must equal the file name stem"),
        ({"per_source_cap": 0}, "field 'per_source_cap' must be an integer >= 1; got 0"),
        ({"per_source_cap": "ten"}, "field 'per_source_cap' must be an integer >= 1; got 'ten'"),
        ({"per_source_cap": True}, "field 'per_source_cap' must be an integer >= 1"),
        ({"per_source_cap": 3, "method": "midppl"}, "'per_source_cap' is not supported with method 'midppl'"),
    ],
)
def test_invalid_specs_are_refused_with_one_line(tmp_path, fields, message):
    path = _write(tmp_path, **fields)
    with pytest.raises(ConfigError, match=message) as info:
        load_target_spec(path, [tmp_path / "data"] if "dev" in fields or "test" in fields else [tmp_path])
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_target_spec(bad, [tmp_path])
    with pytest.raises(ConfigError, match="does not exist"):
        load_target_spec(tmp_path / "none.yaml", [tmp_path])


def test_lm_eval_field_names_a_known_harness_task(tmp_path):
    from idistill_core.errors import ConfigError
    from idistill_core.project.targets import load_target_spec

    (tmp_path / "d.jsonl").write_text("")
    base = "name: t\nmetric: em-number\ndev: d.jsonl\ntest: d.jsonl\nbudget: 4\n"
    good = tmp_path / "t.yaml"
    good.write_text(base + "lm_eval: {task: gsm8k-local}\n")
    assert load_target_spec(good, [tmp_path]).lm_eval == "gsm8k-local"
    good.write_text(base)
    assert load_target_spec(good, [tmp_path]).lm_eval is None
    good.write_text(base + "lm_eval: {task: mmlu-hub}\n")
    with pytest.raises(ConfigError, match="lm_eval"):
        load_target_spec(good, [tmp_path])


def test_per_source_cap_is_optional_and_an_unset_cap_keeps_the_spec_version(tmp_path):
    from idistill_core.project.targets import selection_cap

    plain = load_target_spec(_write(tmp_path), [tmp_path])
    assert plain.per_source_cap is None and selection_cap(plain, 7) == 7  # the profile's cap applies
    before = plain.version()
    capped = load_target_spec(_write(tmp_path, per_source_cap=3), [tmp_path])
    assert capped.per_source_cap == 3 and selection_cap(capped, 7) == 3  # the target's cap overrides it
    assert capped.version() != before
    assert load_target_spec(_write(tmp_path), [tmp_path]).version() == before
    midppl = load_target_spec(_write(tmp_path, method="midppl"), [tmp_path])
    with pytest.raises(ConfigError, match="from the profile recipe"):
        selection_cap(midppl, 7)
