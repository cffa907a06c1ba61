"""Mix files: valid mixes load in file order; invalid ones are refused with one line naming file and field; the
mix selection gives each target its budget share and matches ``select_mix`` on the same scores."""

import numpy as np
import pytest
import yaml

from idistill_core.errors import ConfigError
from idistill_core.project.mixes import load_mix_spec, load_mixes, mix_selection
from idistill_core.steps.select import mix_budgets, select_mix

KNOWN = ("arith", "reading", "mcq")


def _write(tmp_path, **fields):
    spec = {"name": "m", "targets": {"reading": 1, "arith": 3}, "budget": 8}
    spec.update(fields)
    spec = {k: v for k, v in spec.items() if v is not None}
    folder = tmp_path / "mixes"
    folder.mkdir(exist_ok=True)
    path = folder / "m.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_valid_mix_keeps_the_file_order_of_targets(tmp_path):
    path = _write(tmp_path, per_source_cap=2)
    spec = load_mix_spec(path, KNOWN)
    assert list(spec.targets) == ["reading", "arith"] and spec.weights == [1.0, 3.0]
    assert spec.per_source_cap == 2 and spec.budget == 8
    assert load_mixes(tmp_path, KNOWN) == {"m": spec}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"targets": {"arith": 1, "poetry": 1}}, "names unknown target 'poetry'"),
        ({"targets": {"arith": 0}}, "field 'targets.arith' must be a positive finite weight"),
        ({"targets": {"arith": -1}}, "field 'targets.arith' must be a positive finite weight"),
        ({"targets": {}}, "field 'targets' must be a non-empty mapping"),
        ({"budget": 0}, "field 'budget' must be a positive integer"),
        ({"per_source_cap": 0}, "field 'per_source_cap' must be an integer >= 1"),
        ({"name": "other"}, "must equal the file name stem"),
        ({"seed": 3}, "unknown field"),
        ({"budget": None}, "missing required field"),
    ],
)
def test_invalid_mixes_are_refused_with_one_line(tmp_path, fields, message):
    path = _write(tmp_path, **fields)
    with pytest.raises(ConfigError, match=message) as info:
        load_mix_spec(path, KNOWN)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_mix_selection_gives_each_target_its_share_and_matches_select_mix(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"s{i:03d}" for i in range(40)]
    scores = {"reading": rng.normal(size=40), "arith": rng.normal(size=40)}
    # each target's table may list the pool in its own order
    shuffled = rng.permutation(40)
    scored = {"reading": (ids, scores["reading"]),
              "arith": ([ids[i] for i in shuffled], scores["arith"][shuffled])}
    spec = load_mix_spec(_write(tmp_path), KNOWN)
    outcome = mix_selection(spec, scored, {"reading": "id", "arith": "id"})
    direct = select_mix(ids, [scores["reading"], scores["arith"]], 8, [1.0, 3.0])
    assert outcome.selected == direct.sample_ids
    assert outcome.details["budgets"] == mix_budgets(8, [1, 3]) == [2, 6]
    assert np.bincount(outcome.details["picked_by"], minlength=2).tolist() == [2, 6]
    # each target's picks are its own best samples not taken earlier
    by_reading = [s for s, t in zip(outcome.selected, outcome.details["picked_by"]) if t == 0]
    assert by_reading[0] == ids[int(np.argmax(scores["reading"]))]
    with pytest.raises(ConfigError, match="method 'midppl'"):
        mix_selection(spec, scored, {"reading": "midppl", "arith": "id"})
