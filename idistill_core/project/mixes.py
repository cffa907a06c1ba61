"""Multi-target mixes: one YAML file per mix, one subset selected for several targets at once.

A mix file ``targets/mixes/<name>.yaml``::

    name: arith-reading          # must equal the file stem; [a-z0-9_-], used as the Dagster partition key
    description: math and reading in one subset
    targets: {arith: 2, reading: 1}   # target name -> positive weight; target j gets its share of the budget
    budget: 150                  # size of the mixed subset
    per_source_cap: 60           # optional: at most this many samples from one pool source (overrides the recipe)

Each target keeps its own scores (its ``propagated_weights``); the mix only re-selects: target ``j`` gets
``select.mix_budgets(budget, weights)[j]`` picks, taken round-robin by its own score (``pipeline.mix_outcome``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from idistill_core.errors import ConfigError
from idistill_core.project.targets import check_cap, load_yaml_specs, read_named_yaml
from idistill_core.store.hashing import stable_hash

MIXES_SUBDIR = "mixes"
"""Mix files live in this folder of the targets folder (the target registry reads only ``targets/*.yaml``)."""
_REQUIRED = ("name", "targets", "budget")
_OPTIONAL = ("description", "per_source_cap")
UNMIXABLE_METHODS = ("midppl",)
"""Methods whose score is not "higher helps more" (midppl ranks a perplexity band), so a mix cannot rank by it."""


@dataclass(frozen=True)
class MixSpec:
    name: str
    targets: dict[str, float]
    """Target name -> positive weight, in file order (the round-robin visits targets in this order)."""
    budget: int
    per_source_cap: int | None = None
    description: str = ""
    source_file: Path | None = field(default=None, compare=False)

    @property
    def weights(self) -> list[float]:
        return list(self.targets.values())

    def version(self) -> str:
        """Hash of the spec: changes when anything the mix selects with changes (targets' own changes reach
        the mix through their ``propagated_weights``)."""
        return stable_hash(
            {"targets": list(self.targets.items()), "budget": self.budget, "cap": self.per_source_cap}, 16
        )


def load_mix_spec(path: str | Path, known_targets: Collection[str]) -> MixSpec:
    """Parse and validate one mix YAML against the registered target names."""
    path = Path(path)
    raw, name = read_named_yaml(path, "mix", _REQUIRED, _OPTIONAL)
    targets = raw["targets"]
    if not isinstance(targets, dict) or not targets:
        raise ConfigError(f"{path}: field 'targets' must be a non-empty mapping of target name -> weight.")
    weights = {}
    for target, weight in targets.items():
        target = str(target)
        if target not in known_targets:
            known = ", ".join(sorted(known_targets)) or "none registered"
            raise ConfigError(f"{path}: field 'targets' names unknown target {target!r} (known: {known}).")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0 or weight == float("inf"):
            raise ConfigError(f"{path}: field 'targets.{target}' must be a positive finite weight; got {weight!r}.")
        weights[target] = float(weight)
    budget = raw["budget"]
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise ConfigError(f"{path}: field 'budget' must be a positive integer; got {budget!r}.")
    if not isinstance(raw.get("description", ""), str):
        raise ConfigError(f"{path}: field 'description' must be a string; got {raw['description']!r}.")
    return MixSpec(
        name=name,
        targets=weights,
        budget=budget,
        per_source_cap=check_cap(raw.get("per_source_cap"), path),
        description=str(raw.get("description", "")),
        source_file=path,
    )


def mixes_dir(targets_dir: str | Path) -> Path:
    return Path(targets_dir) / MIXES_SUBDIR


def load_mixes(
    targets_dir: str | Path, known_targets: Collection[str], errors: dict[str, str] | None = None
) -> dict[str, MixSpec]:
    """All mixes in ``<targets_dir>/mixes/*.yaml``, by name.

    An invalid file raises its one-line ConfigError; with ``errors`` it is skipped instead and its line recorded
    there under the file's stem (what the mix registry sensor reports as a failed check, never a crash).
    """
    return load_yaml_specs(mixes_dir(targets_dir), lambda path: load_mix_spec(path, known_targets), errors)


def mix_selection(
    spec: MixSpec,
    scored: Mapping[str, tuple[Sequence[str], np.ndarray]],
    methods: Mapping[str, str],
    recipe_cap: int | None = None,
    source_of: Mapping[str, str] | None = None,
):
    """The mix's subset from each target's per-sample scores (``pipeline.mix_outcome``).

    Args:
        scored: target name -> (pool sample ids, ``(N,)`` scores), e.g. read from its ``propagated_weights``.
        methods: target name -> its selection method (a midppl score cannot be ranked, so it is refused).
        recipe_cap: the profile recipe's ``per_source_cap``; the mix's own cap overrides it.
        source_of: sample id -> pool source (needed when a cap applies).

    Returns:
        ``pipeline.SelectionOutcome`` with ``details['budgets']`` (per-target counts, in ``spec.targets`` order)
        and ``details['picked_by']`` (which target picked each selected sample).
    """

    from idistill_core.pipeline.selection import SelectionOutcome, mix_outcome

    outcomes = []
    for target in spec.targets:
        if target not in scored:
            raise ConfigError(f"{spec.source_file}: target {target!r} has no scores yet (materialize its "
                              "propagated_weights first).")
        if methods.get(target) in UNMIXABLE_METHODS:
            raise ConfigError(f"{spec.source_file}: target {target!r} uses method {methods[target]!r}, whose score "
                              "does not rank samples; mixes need score-ranked targets (id, exact, rds, random).")
        ids, scores = scored[target]
        outcomes.append(SelectionOutcome(list(ids), np.asarray(scores, dtype=np.float64), np.zeros(len(ids)), [], methods.get(target, "")))
    cap = spec.per_source_cap if spec.per_source_cap is not None else recipe_cap
    return mix_outcome(outcomes, spec.budget, spec.weights, cap, source_of)
