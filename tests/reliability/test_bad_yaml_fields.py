"""Issue 25 — every field of a settings profile, a target YAML and a mix YAML has a type and a range: a value of
another type or out of its range is one ConfigError line naming the file and the field, raised while the file
is read (before any model or data is touched). Through the CLI (`--profile`) that is exit status 2, nothing
written and an existing store unchanged; in Dagster a bad target or mix file fails the `registry_valid` check
with that line and the registry sensor keeps running (see also test_registry_sensor_bad_files.py).

Property-based: the profile's fields are found by walking its dataclasses (`Settings` and every config it
nests), so a field added later is covered by the type properties without editing this file; `RANGES` lists the
numeric fields' ranges, and `test_every_numeric_profile_field_has_a_range_here` fails for a numeric field it
does not list. Fields whose config lacks its range check are strict xfails (`MISSING_CHECKS`): when the check
is added they pass, and strict makes the suite say so.
"""

import copy
import dataclasses
import math
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from idistill_core.cli import main
from idistill_core.errors import ConfigError
from idistill_core.project.mixes import load_mix_spec
from idistill_core.project.settings import (
    SEED_MAX,
    EvalSettings,
    OrchestrationSettings,
    PoolSettings,
    load_settings,
)
from idistill_core.project.targets import load_target_spec
from idistill_core.steps.gradients import PROJECTION_REVISION

from .cli import snapshot
from .conftest import REPO, store_rows

FAST = settings(  # no shrinking: the strict xfails below fail on purpose, and shrinking them costs seconds each
    max_examples=6, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BASE = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())


def _sections():
    from idistill_core.backends import BackendConfig
    from idistill_core.pipeline.recipe import SelectionRecipe
    from idistill_core.training.finetune import FinetuneConfig

    return {"recipe": SelectionRecipe, "pool": PoolSettings, "eval": EvalSettings, "finetune": FinetuneConfig,
            "backend": BackendConfig, "orchestration": OrchestrationSettings}


def _fields(cls, prefix: str) -> list[tuple[str, Any]]:
    """(dotted path, type hint) of every init field of ``cls``, nested configs included."""
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = typing.get_type_hints(cls)[f.name]
        out.append((f"{prefix}.{f.name}", hint))
        if dataclasses.is_dataclass(hint):
            out += _fields(hint, f"{prefix}.{f.name}")
    return out


TOP = [("model", str), ("home", str), ("targets_dir", str), ("embeddings_table", str),
       ("fidelity_warn_below", float), ("commit_every", int)]
FIELDS = TOP + [field for name, cls in _sections().items() for field in _fields(cls, name)]

def R(low, high=None, low_open=False, high_open=False):
    """The valid range of a numeric field: [low, high], ends open where said (high None: unbounded)."""
    return (low, high, low_open, high_open)


SEED, POS, NONNEG, GT0 = R(0, SEED_MAX), R(1), R(0), R(0, low_open=True)
UNIT_OPEN_HIGH, UNIT_OPEN_LOW = R(0, 1, high_open=True), R(0, 1, low_open=True)
# numeric profile field -> its valid range (for a list field: of each element)
RANGES = {
    "commit_every": POS, "fidelity_warn_below": R(-1, 1),
    "recipe.num_landmarks": POS, "recipe.num_holdout": NONNEG, "recipe.refine_landmarks": NONNEG, "recipe.max_length": POS, "recipe.lr": GT0,
    "recipe.hessian_targets": POS, "recipe.hessian_proj_dim": POS, "recipe.batch_size": POS, "recipe.seed": SEED, "recipe.per_source_cap": POS,
    "recipe.landmarks.first_round": UNIT_OPEN_LOW, "recipe.landmarks.leverage_ridge": GT0,
    "recipe.landmarks.leverage_columns": POS,
    "recipe.embed.num_blocks": POS, "recipe.embed.num_tangents": POS, "recipe.embed.proj_dim": POS,
    "recipe.embed.seed": SEED, "recipe.embed.batch_size": POS,
    "recipe.gradients.max_params": POS, "recipe.gradients.proj_dim": POS, "recipe.gradients.seed": SEED,
    "recipe.gradients.batch_size": POS, "recipe.gradients.proj_revision": R(PROJECTION_REVISION, PROJECTION_REVISION),
    "recipe.propagate.ridge": GT0, "recipe.propagate.bandwidth_scale": GT0, "recipe.propagate.bandwidth_sample": R(2),
    "recipe.propagate.chunk_size": POS, "recipe.propagate.seed": SEED, "recipe.propagate.ridge_grid": GT0,
    "recipe.propagate.bandwidth_grid": GT0, "recipe.propagate.cv_folds": R(2), "recipe.propagate.cv_directions": NONNEG,
    "recipe.warmup.steps": POS, "recipe.warmup.batch_size": POS, "recipe.warmup.lr": GT0,
    "recipe.warmup.weight_decay": NONNEG, "recipe.warmup.betas": UNIT_OPEN_HIGH, "recipe.warmup.eps": GT0,
    "recipe.warmup.seed": SEED, "recipe.warmup.max_grad_norm": GT0,
    "recipe.less.warmup_fraction": UNIT_OPEN_LOW, "recipe.less.epochs": POS, "recipe.less.lora_rank": POS,
    "recipe.less.lora_alpha": GT0, "recipe.less.lora_dropout": UNIT_OPEN_HIGH, "recipe.less.lr": GT0,
    "recipe.less.warmup_ratio": UNIT_OPEN_HIGH, "recipe.less.weight_decay": NONNEG,
    "recipe.less.betas": UNIT_OPEN_HIGH, "recipe.less.eps": GT0, "recipe.less.batch_size": POS,
    "recipe.less.max_grad_norm": GT0, "recipe.less.proj_dim": POS, "recipe.less.seed": SEED,
    "pool.builtin_size": POS, "pool.builtin_seed": SEED, "pool.limit": POS,
    "eval.max_test": POS, "eval.max_new_tokens": POS, "eval.batch_size": POS,
    "finetune.lr": GT0, "finetune.epochs": POS, "finetune.max_steps": POS, "finetune.batch_size": POS,
    "finetune.grad_accum": POS, "finetune.warmup_ratio": UNIT_OPEN_HIGH, "finetune.weight_decay": NONNEG,
    "finetune.max_grad_norm": GT0, "finetune.seed": SEED, "finetune.lora_rank": POS, "finetune.lora_alpha": GT0,
    "backend.num_actors": POS, "backend.cpus_per_actor": GT0, "backend.gpus_per_actor": NONNEG,
    "backend.object_store_mb": POS, "backend.samples_per_task": POS, "backend.max_restarts": NONNEG,
    "orchestration.keep_versions": POS, "orchestration.device_slots": POS,
}
# fields whose config has no range check yet (steps/, pipeline/, methods/ are the lead's): the check to add
MISSING_CHECKS: dict[str, str] = {}  # every numeric field's config checks its range now


def _numeric(hint) -> bool:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType, tuple):
        return any(_numeric(a) for a in args if a is not Ellipsis)
    return hint in (int, float)


def _is(hint, kind) -> bool:
    return hint is kind or kind in typing.get_args(hint)


def _kind(hint) -> str:
    """dataclass | tuple | float | int | bool | str: what a field holds (None-able or not)."""
    if dataclasses.is_dataclass(hint):
        return "dataclass"
    if typing.get_origin(hint) is tuple:
        return "tuple"
    for kind, name in ((float, "float"), (int, "int"), (bool, "bool")):
        if _is(hint, kind):
            return name
    return "str"  # str, a Literal of strings, or either or None


def _wrong_typed(hint) -> st.SearchStrategy:
    """YAML values that are not of the field's type at all (whatever its range); never None (null is the default
    of the fields that may be null)."""
    mappings = st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), min_size=1, max_size=2)
    common = [mappings, st.dates()]
    kind = _kind(hint)
    if kind == "dataclass":
        return st.one_of(*common, st.integers(), st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2))
    if kind == "tuple":
        return st.one_of(*common, st.integers(), st.booleans(), st.text(min_size=1, max_size=5).filter(lambda t: t != "auto"))
    listy = st.lists(st.integers(), min_size=1, max_size=2)
    if kind == "str":
        return st.one_of(*common, listy, st.integers(), st.booleans(), st.floats(allow_nan=False))
    if kind == "bool":
        return st.one_of(*common, listy, st.integers(0, 1), st.sampled_from(["yes", "true", "on", ""]))
    if kind == "int":
        return st.one_of(*common, listy, st.booleans(), st.sampled_from([2.0, 1.5, -0.0, 1e300, "1", "x", "", "1e3"]))
    return st.one_of(*common, listy, st.booleans(), st.sampled_from([math.nan, math.inf, -math.inf, "1.0", "x", ""]))


def _out_of_range(low, high, low_open, high_open, integral: bool) -> st.SearchStrategy:
    """Values just outside (and far outside) the range, of the field's own type."""
    if integral:
        below = st.integers(max_value=math.ceil(low) - (0 if low_open else 1))
        above = st.integers(min_value=math.floor(high) + (0 if high_open else 1)) if high is not None else None
    else:
        finite = {"allow_nan": False, "allow_infinity": False}
        below = st.floats(max_value=low, exclude_max=not low_open, **finite)
        above = st.floats(min_value=high, exclude_min=not high_open, **finite) if high is not None else None
    return below if above is None else below | above


def _set(profile: dict, dotted: str, value) -> dict:
    raw = copy.deepcopy(profile)
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return raw


def _refused(raw: dict, field: str) -> str:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "profile.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        with pytest.raises(ConfigError) as caught:
            load_settings(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert field.split(".")[-1] in message, message  # the field is named
    return message


def _hint(field: str):
    return dict(FIELDS)[field]


@pytest.mark.parametrize("field", [f for f, _ in FIELDS], ids=[f for f, _ in FIELDS])
@FAST
@given(data=st.data())
def test_a_wrong_typed_profile_field_is_one_line_naming_file_and_field(field, data):
    hint = _hint(field)
    _refused(_set(BASE, field, data.draw(_wrong_typed(hint))), field)


def _range_cases():
    cases = []
    for field in RANGES:
        marks = [pytest.mark.xfail(strict=True, reason=MISSING_CHECKS[field])] if field in MISSING_CHECKS else []
        cases.append(pytest.param(field, marks=marks, id=field))
    return cases


@pytest.mark.parametrize("field", _range_cases())
@FAST
@given(data=st.data())
def test_an_out_of_range_profile_field_is_one_line_naming_file_and_field(field, data):
    _refused(_set(BASE, field, data.draw(_bad_value(field))), field)


def _bad_value(field: str) -> st.SearchStrategy:
    """A value of the field's type outside its range (a list field: its first element)."""
    hint = _hint(field)
    kind = _kind(hint)
    integral = kind == "int" or (kind == "tuple" and typing.get_args(hint)[0] is int)
    values = _out_of_range(*RANGES[field], integral)
    if kind == "tuple":  # a grid or betas: one bad element
        rest = list(getattr(_default(field), field.split(".")[-1]))[1:]
        return values.map(lambda v: [v, *rest])
    return values


def _default(field: str):
    section, *rest = field.split(".")
    obj = _sections()[section]()
    for part in rest[:-1]:
        obj = getattr(obj, part)
    return obj


def test_every_numeric_profile_field_has_a_range_here():
    numeric = {f for f, hint in FIELDS if _numeric(hint)}
    assert numeric == set(RANGES), {"missing": sorted(numeric - set(RANGES)), "stale": sorted(set(RANGES) - numeric)}


# ---------------------------------------------------------------------------------------------------------
# through the CLI: exit 2, one line, nothing written, an existing store unchanged
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def existing_store(tmp_path_factory):
    """A LanceDB store that a valid run filled (the micro pool), to check a refused run leaves it alone."""
    from .cli import micro_data, select_argv

    folder = tmp_path_factory.mktemp("store")
    data = micro_data(folder)
    store = folder / "store"
    assert main(select_argv(data, folder / "first.parquet", store)) == 0
    return data, store


@FAST
@given(field=st.sampled_from([f for f, _ in FIELDS if f not in MISSING_CHECKS]), data=st.data())
def test_a_bad_profile_field_through_the_cli_is_exit_2_one_line_and_leaves_the_store_unchanged(
    existing_store, field, data, capsys
):
    from .cli import select_argv

    pool, store = existing_store
    if field in RANGES and data.draw(st.booleans()):
        value = data.draw(_bad_value(field))
    else:
        value = data.draw(_wrong_typed(_hint(field)))
    before, rows = snapshot(store), store_rows(store)
    with tempfile.TemporaryDirectory() as scratch:
        profile = Path(scratch) / "bad.yaml"
        profile.write_text(yaml.safe_dump(_set(yaml.safe_load(pool["profile"].read_text()), field, value)))
        out = Path(scratch) / "selection.parquet"
        code = main(select_argv({**pool, "profile": profile}, out, store))
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("idistill:")]
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert len(lines) == 1 and lines[0].startswith("idistill: error: ConfigError: ") and "bad.yaml" in lines[0], err
        assert not out.exists()
    assert snapshot(store) == before and store_rows(store) == rows


# ---------------------------------------------------------------------------------------------------------
# target and mix YAML
# ---------------------------------------------------------------------------------------------------------
TARGET = {"name": "arith", "metric": "em-number", "dev": "builtin/targets/arith/dev.jsonl",
          "test": "builtin/targets/arith/test.jsonl", "budget": 12}
SCALAR_JUNK = st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.dates(),
                        st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
# field -> values that are not a valid value of it (wrong type or out of range)
TARGET_BAD = {
    "name": st.one_of(SCALAR_JUNK, st.text(max_size=10).filter(lambda t: t != "arith")),
    "metric": st.one_of(SCALAR_JUNK, st.text(max_size=10).filter(lambda t: t not in ("em-number", "squad", "mc", "nll"))),
    "dev": st.one_of(SCALAR_JUNK, st.sampled_from(["", " ", "../../../../etc/passwd", "/etc/passwd"])),
    "test": st.one_of(SCALAR_JUNK, st.sampled_from(["", "../../outside.jsonl", "/"])),
    "budget": st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.none(), st.text(max_size=4)),
    "description": st.one_of(st.integers(), st.lists(st.text(max_size=3), min_size=1, max_size=2), st.booleans()),
    "format": st.one_of(SCALAR_JUNK, st.text(max_size=8).filter(lambda t: t not in ("auto", "chat", "tulu", "gsm8k", "squad", "mmlu"))),
    "method": st.one_of(SCALAR_JUNK, st.text(max_size=8).filter(lambda t: t not in ("id", "exact", "rds", "random", "midppl", "less"))),
    "order": st.one_of(SCALAR_JUNK, st.text(max_size=8).filter(lambda t: t not in ("first", "second"))),
    "aggregate": st.one_of(SCALAR_JUNK, st.text(max_size=8).filter(lambda t: t not in ("mean", "rr"))),
    "finetune": st.one_of(st.integers(), st.text(max_size=4), st.none(), st.floats()),
    "evaluate": st.one_of(st.integers(), st.text(max_size=4), st.none(), st.floats()),
    "lm_eval": st.one_of(st.integers(), st.text(min_size=1, max_size=6), st.booleans(),
                         st.fixed_dictionaries({"task": st.text(max_size=6)}), st.just({"task": "gsm8k-local", "x": 1})),
    "per_source_cap": st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.text(max_size=4)),
}
MIX = {"name": "both", "targets": {"arith": 2, "reading": 1}, "budget": 20}
MIX_BAD = {
    "name": TARGET_BAD["name"].filter(lambda t: t != "both"),
    "targets": st.one_of(SCALAR_JUNK.filter(lambda v: not (isinstance(v, dict) and v)),
                         st.dictionaries(st.sampled_from(["arith", "reading", "nope"]),
                                         st.one_of(st.integers(max_value=0), st.floats().filter(lambda v: not (math.isfinite(v) and v > 0)),
                                                   st.booleans(), st.text(max_size=3), st.none()), min_size=1, max_size=2),
                         st.just({"nope": 1})),
    "budget": TARGET_BAD["budget"],
    "description": TARGET_BAD["description"],
    "per_source_cap": TARGET_BAD["per_source_cap"],
}


def test_the_bad_value_tables_name_every_target_and_mix_field():
    from idistill_core.project import mixes, targets

    assert set(TARGET_BAD) == set(targets._REQUIRED) | set(targets._OPTIONAL)
    assert set(MIX_BAD) == set(mixes._REQUIRED) | set(mixes._OPTIONAL)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("home") / "data"
    for name in ("arith", "reading"):
        folder = root / "builtin" / "targets" / name
        folder.mkdir(parents=True)
        for split in ("dev", "test"):
            (folder / f"{split}.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    return root


def _yaml_refused(load, folder: Path, name: str, raw: dict, field: str) -> str:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    assert field in message or (field in ("dev", "test") and "escapes" in message), message
    return message


@pytest.mark.parametrize("field", sorted(TARGET_BAD))
@FAST
@given(data=st.data())
def test_a_bad_target_field_is_one_line_naming_file_and_field(field, data, data_root):
    value = data.draw(TARGET_BAD[field])
    with tempfile.TemporaryDirectory() as scratch:
        load = lambda path: load_target_spec(path, [data_root])
        _yaml_refused(load, Path(scratch), "arith", {**TARGET, field: value}, field)


@pytest.mark.parametrize("field", sorted(MIX_BAD))
@FAST
@given(data=st.data())
def test_a_bad_mix_field_is_one_line_naming_file_and_field(field, data):
    value = data.draw(MIX_BAD[field])
    with tempfile.TemporaryDirectory() as scratch:
        load = lambda path: load_mix_spec(path, {"arith", "reading"})
        message = _yaml_refused(load, Path(scratch), "both", {**MIX, field: value}, field.split(".")[0])
    assert message


def test_the_good_target_and_mix_files_load(data_root, tmp_path):
    (tmp_path / "arith.yaml").write_text(yaml.safe_dump(TARGET))
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(MIX))
    assert load_target_spec(tmp_path / "arith.yaml", [data_root]).budget == 12
    assert load_mix_spec(tmp_path / "both.yaml", {"arith", "reading"}).budget == 20
