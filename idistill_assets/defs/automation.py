"""How the graph follows its inputs: declarative automation, the target registry, jobs and schedules.

- Every asset carries `follow_inputs()`: run when missing, when an upstream's *data version* changed (not merely
  re-ran), or when its own code version changed; never while an upstream is missing or in progress. Downstream
  assets see `will_be_requested`, so a whole per-target chain is requested in one tick.
- Automation-condition sensors evaluate them: `automation` for the cheap assets (running by default) and
  `automation_heavy` for the device-hour ones (stopped unless the profile says `orchestration.automate_heavy`;
  toggle it in the UI). With the switch on, one sensor evaluates everything, so chains are never split.
- `target_registry_sensor` launches nothing: it turns targets/*.yaml into dynamic partitions (adds and
  removals) and reports each new or edited spec as an observation of `target_spec` (its data version);
  `mix_registry_sensor` does the same for targets/mixes/*.yaml (`mixes` partitions, `mix_spec`).
- The code version of each asset folds in the profile fields it reads (`code_versions`), so a profile edit
  makes exactly the affected assets (and their downstream) stale.
"""

import json

import dagster as dg

from idistill_assets.defs.shared import PREFIX
from idistill_assets.partitions import mixes, targets
from idistill_assets.resources import WRITER_POOL, IdistillResource
from idistill_core.store.hashing import config_fingerprint, stable_hash

DATA_VERSION_TAG = "dagster/data_version"
HEAVY = [
    "embeddings",
    "rds_features",
    "warmup",
    "landmarks",
    "propagation",
    "target_gradients",
    "finetuned_checkpoint",
    "random_checkpoint",
    "eval_scores",
]


OPTIONAL = ["rds_features"]
"""Assets that only some targets read (an empty marker while none does); one never materialized blocks nothing."""


def key(name: str) -> dg.AssetKey:
    return dg.AssetKey([PREFIX, name])


def follow_inputs() -> dg.AutomationCondition:
    """Like Dagster's `eager()`, but an upstream counts as changed only when its data version changed, and a
    code-version change (a profile edit, see `code_versions`) re-runs the asset itself."""
    ac = dg.AutomationCondition
    upstream_changed = ac.any_deps_match(
        (ac.data_version_changed() & ~ac.executed_with_root_target()).with_label("data_version_changed")
        | ac.will_be_requested()
    ).with_label("upstream data version changed")
    return (
        (ac.newly_missing() | upstream_changed | ac.code_version_changed()).since_last_handled()
        & ~ac.any_deps_missing().ignore(dg.AssetSelection.assets(*[key(n) for n in OPTIONAL]))
        & ~ac.any_deps_in_progress()
        & ~ac.in_progress()
    ).with_label("follow_inputs")


def code_versions(settings) -> dict[str, str]:
    """Each asset's code version: its code revision plus a fingerprint of the profile fields it reads."""
    r, model = settings.recipe, settings.model
    tokens = {"model": model, "max_length": r.max_length, "on_overflow": r.on_overflow}
    # an unset cap adds nothing, so profiles without one keep their code versions
    cap = {"per_source_cap": r.per_source_cap} if r.per_source_cap is not None else {}
    parts = {
        "pool": ("pool-v1", {"pool": config_fingerprint(settings.pool)}),
        "base_model": ("model-v1", {"model": model}),
        "embeddings": ("embed-v1", {**tokens, "embed": config_fingerprint(r.embed)}),
        "warmup": ("warmup-v1", {**tokens, "optimizer": r.optimizer, "warmup": config_fingerprint(r.warmup)}),
        "landmarks": (
            "landmarks-v1",
            {
                **tokens,
                "num_landmarks": r.num_landmarks,
                "num_holdout": r.num_holdout,
                "seed": r.seed,
                "optimizer": r.optimizer,
                "gradients": config_fingerprint(r.gradients),
            },
        ),
        # centring enters only when on (and, for the propagation, only when it feeds the kernel selection), so
        # the default recipe's versions are unchanged
        "propagation": (
            "propagation-v1",
            {"propagate": config_fingerprint(r.propagate), **({"center": True} if r.center and r.propagate.needs_selection else {})},
        ),
        "rds_features": ("rds-features-v1", tokens),
        "target_gradients": ("target-grads-v1", {**tokens, "gradients": config_fingerprint(r.gradients)}),
        # hessian_targets: which target samples the second order's Hessian uses (first-order values ignore it)
        "landmark_influence": (
            "influence-v1",
            {"lr": r.lr, "optimizer": r.optimizer, "hessian_targets": r.hessian_targets, **({"center": True} if r.center else {})},
        ),
        "propagated_weights": (
            "propagate-v1",
            {
                "propagate": config_fingerprint(r.propagate),
                "seed": r.seed,
                "lr": r.lr,
                "batch_size": r.batch_size,
                **cap,
            },
        ),
        "selected_subset": ("subset-v1", cap),
        "mixed_subset": ("mix-v1", cap),
        "finetuned_checkpoint": (
            "finetune-v1",
            {**tokens, "finetune": config_fingerprint(settings.finetune)},
        ),
        "random_checkpoint": ("finetune-v1", {**tokens, "finetune": config_fingerprint(settings.finetune)}),
        "eval_scores": ("eval-v1", {"eval": config_fingerprint(settings.eval)}),
    }
    return {
        name: f"{base}-{stable_hash(fields, 8)}" if fields else base for name, (base, fields) in parts.items()
    }


def with_profile(assets: list, settings) -> list:
    """The assets with profile-derived code versions and `follow_inputs` (the observable spec has neither)."""
    versions = code_versions(settings) if settings is not None else {}

    def update(spec: dg.AssetSpec) -> dg.AssetSpec:
        name = spec.key.path[-1]
        if name in ("target_spec", "mix_spec"):  # observed by the registry sensors
            return spec
        return spec.replace_attributes(
            code_version=versions.get(name, spec.code_version), automation_condition=follow_inputs()
        )

    return [
        a.map_asset_specs(update) if hasattr(a, "map_asset_specs") and a.is_executable else a for a in assets
    ]


def automation_sensors(settings) -> list[dg.AutomationConditionSensorDefinition]:
    everything = dg.AssetSelection.groups("shared", "target", "mix")
    heavy = dg.AssetSelection.assets(*[key(n) for n in HEAVY])
    if settings is not None and settings.orchestration.automate_heavy:
        return [
            dg.AutomationConditionSensorDefinition(
                "automation",
                target=everything,
                default_status=dg.DefaultSensorStatus.RUNNING,
                description="Declarative automation of every asset (orchestration.automate_heavy is on).",
            )
        ]
    return [
        dg.AutomationConditionSensorDefinition(
            "automation",
            target=everything - heavy,
            default_status=dg.DefaultSensorStatus.RUNNING,
            description="Declarative automation of the cheap assets (the device-hour ones are in automation_heavy).",
        ),
        dg.AutomationConditionSensorDefinition(
            "automation_heavy",
            target=heavy,
            default_status=dg.DefaultSensorStatus.STOPPED,
            description="Declarative automation of embeddings, gradients, fine-tuning and eval: start it here, or "
            "set orchestration.automate_heavy: true in the profile.",
        ),
    ]


shared_job = dg.define_asset_job(
    "shared_job",
    selection=dg.AssetSelection.groups("shared"),
    description="Pool, base model, embeddings (incremental), warm-up, landmarks and (when a target uses rds) RDS+ "
    "features: everything targets share.",
)
target_job = dg.define_asset_job(
    "target_job",
    selection=dg.AssetSelection.groups("target") - dg.AssetSelection.assets(key("target_spec")),
    description="Everything of one target partition: gradients → influence → weights → subset → fine-tune → eval "
    "(fine-tune and eval skip, with the reason, for targets that opt out).",
)
selection_job = dg.define_asset_job(
    "selection_job",
    selection=dg.AssetSelection.assets(
        *[key(k) for k in ("target_gradients", "landmark_influence", "propagated_weights", "selected_subset")]
    ),
    description="Selection only (no fine-tuning) for one target partition.",
)
mix_job = dg.define_asset_job(
    "mix_job",
    selection=dg.AssetSelection.assets(key("mixed_subset")),
    description="One multi-target mix partition: re-select from its targets' current propagated_weights.",
)
refresh_job = dg.define_asset_job(
    "refresh_job",
    selection=dg.AssetSelection.assets(key("pool"), key("base_model")),
    description="Re-read the pool and the model; their data versions are content hashes, so an unchanged input "
    "leaves everything downstream up to date.",
)


REGISTRY_CHECK = "registry_valid"
"""The check on `target_spec` / `mix_spec` that fails, with each invalid file's one-line error, while a registry
file cannot be read; the registry sensors report it (a sensor never crashes on a bad file)."""
_INVALID = "!invalid"
"""Cursor key of the invalid files' errors (no partition key can start with '!')."""


def _versions(specs: dict, errors: dict[str, str]) -> dict[str, str]:
    """Each spec's version; a spec whose dev/test file cannot be hashed (a folder, unreadable) joins ``errors``."""
    versions = {}
    for name, spec in specs.items():
        try:
            versions[name] = spec.version()
        except OSError as error:
            errors[name] = f"{spec.source_file}: cannot read a file it names ({error.strerror or error}: {error.filename})."
    return versions


def registry_versions(res: IdistillResource, errors: dict[str, str] | None = None) -> dict[str, str]:
    """Version of every valid target spec; with ``errors``, invalid files are recorded there (file stem -> one
    line) instead of raising."""
    from idistill_core.project.targets import load_registry

    specs = load_registry(res.settings.targets_dir, res.settings.data_roots, errors)
    return _versions(specs, errors if errors is not None else {})


def registry_check(errors: dict[str, str], spec_key: str = "target_spec", what: str = "target"):
    """The `registry_valid` check's evaluation: passed, or failed with each invalid file's line."""
    lines = [errors[name] for name in sorted(errors)]
    return dg.AssetCheckEvaluation(
        asset_key=key(spec_key),
        check_name=REGISTRY_CHECK,
        passed=not errors,
        description=lines[0] if lines else f"every {what} file is valid",
        metadata={"invalid_files": len(lines), "errors": "\n".join(lines) or "none"},
    )


def registry_tick(
    current: dict[str, str], known_partitions: set[str], cursor: str | None,
    partitions_def: dg.DynamicPartitionsDefinition = targets, spec_key: str = "target_spec", what: str = "target",
    errors: dict[str, str] | None = None,
):
    """One tick of the registry: partitions to add/remove and an observation per new or edited spec. No runs:
    declarative automation decides what the new data versions require.

    ``errors`` (file stem -> one-line error) are the files that cannot be read: they get no new partition, an
    existing partition is kept (and its last valid version) until the file is fixed or deleted, and the
    `registry_valid` check is reported failed with their lines whenever the set of errors changes (passed again
    once it is empty)."""
    errors = dict(errors or {})
    previous = json.loads(cursor) if cursor else {}
    previous_errors = previous.pop(_INVALID, {})
    added = sorted(set(current) - known_partitions)
    removed = sorted(known_partitions - set(current) - set(errors))
    observed = sorted(k for k in current if previous.get(k) != current[k])
    check_changed = errors != previous_errors
    if not (added or removed or observed or check_changed):
        invalid = f"; {len(errors)} invalid: {errors[min(errors)]}" if errors else ""
        return dg.SkipReason(f"{what} registry unchanged ({len(current)} {what}s{invalid})")
    requests = []
    if added:
        requests.append(partitions_def.build_add_request(added))
    if removed:
        requests.append(partitions_def.build_delete_request(removed))
    observations = [
        dg.AssetObservation(
            asset_key=key(spec_key), partition=name, tags={DATA_VERSION_TAG: current[name]}
        )
        for name in observed
    ]
    if check_changed:
        observations.append(registry_check(errors, spec_key, what))
    return dg.SensorResult(
        dynamic_partitions_requests=requests,
        asset_events=observations,
        cursor=json.dumps({**current, **({_INVALID: errors} if errors else {})}, sort_keys=True),
    )


@dg.sensor(minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING)
def target_registry_sensor(context: dg.SensorEvaluationContext, idistill: IdistillResource):
    """Syncs targets/*.yaml to the `targets` partitions and observes each new or edited spec; launches nothing.
    A file that cannot be read fails the `registry_valid` check with its line; the sensor itself never fails."""
    from idistill_core.errors import IdistillError

    known = set(context.instance.get_dynamic_partitions(targets.name))
    errors: dict[str, str] = {}
    try:
        versions = registry_versions(idistill, errors)
    except IdistillError as error:  # the profile itself is invalid: nothing to sync until it is fixed
        return dg.SkipReason(f"target registry not read: {error}")
    return registry_tick(versions, known, context.cursor, errors=errors)


def mix_versions(res: IdistillResource, errors: dict[str, str] | None = None) -> dict[str, str]:
    """Version of every valid mix spec; with ``errors``, invalid mix files are recorded there instead of raising
    (an invalid target file only makes the target unknown to the mixes: its own check reports it)."""
    from idistill_core.project.mixes import load_mixes
    from idistill_core.project.targets import load_registry

    known = load_registry(res.settings.targets_dir, res.settings.data_roots, {} if errors is not None else None)
    return _versions(load_mixes(res.settings.targets_dir, known, errors), errors if errors is not None else {})


@dg.sensor(minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING)
def mix_registry_sensor(context: dg.SensorEvaluationContext, idistill: IdistillResource):
    """Syncs targets/mixes/*.yaml to the `mixes` partitions and observes each new or edited mix; launches nothing.
    A file that cannot be read fails the `registry_valid` check of `mix_spec` with its line; never a crash."""
    from idistill_core.errors import IdistillError

    known = set(context.instance.get_dynamic_partitions(mixes.name))
    errors: dict[str, str] = {}
    try:
        versions = mix_versions(idistill, errors)
    except IdistillError as error:
        return dg.SkipReason(f"mix registry not read: {error}")
    return registry_tick(versions, known, context.cursor, mixes, "mix_spec", "mix", errors=errors)


def stale_or_missing(instance: dg.DagsterInstance, asset_graph) -> dict[str | None, list[dg.AssetKey]]:
    """Materializable assets whose partition is missing or stale, by partition (None = unpartitioned), in the
    instance's own staleness terms (the per-partition view the global graph does not show, dagster #22553)."""
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContext

    class _Loading(LoadingContext):  # the resolver's batching cache, outside a webserver request
        def __init__(self):
            self._loaders = {}

        @property
        def instance(self):
            return instance

        @property
        def loaders(self):
            return self._loaders

    resolver = CachingStaleStatusResolver(instance, asset_graph, _Loading())
    partitions = instance.get_dynamic_partitions(targets.name)
    todo: dict[str | None, list[dg.AssetKey]] = {}
    for node in asset_graph.asset_nodes:
        if not node.is_materializable:
            continue
        if node.partitions_def is not None and getattr(node.partitions_def, "name", None) != targets.name:
            continue  # mixes follow their targets through declarative automation, not this schedule
        for partition in partitions if node.partitions_def is not None else [None]:
            if resolver.get_status(node.key, partition) != StaleStatus.FRESH:
                todo.setdefault(partition, []).append(node.key)
    return todo


def stale_run_requests(instance: dg.DagsterInstance, asset_graph, tag: str) -> list[dg.RunRequest]:
    todo = stale_or_missing(instance, asset_graph)
    requests = []
    if None in todo:
        requests.append(dg.RunRequest(run_key=f"{tag}:shared", asset_selection=todo.pop(None)))
    for partition in sorted(todo):
        requests.append(
            dg.RunRequest(
                run_key=f"{tag}:{partition}", partition_key=partition, asset_selection=todo[partition]
            )
        )
    return requests


@dg.schedule(job=refresh_job, cron_schedule="0 3 * * *", default_status=dg.DefaultScheduleStatus.STOPPED)
def daily_refresh_schedule(context: dg.ScheduleEvaluationContext):
    """03:00: re-read the pool and the model (cheap; content-hash data versions)."""
    return dg.RunRequest(run_key=f"refresh-{context.scheduled_execution_time:%Y-%m-%d}")


@dg.schedule(
    target=dg.AssetSelection.groups("shared", "target") - dg.AssetSelection.assets(key("target_spec")),
    cron_schedule="30 3 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
)
def daily_stale_schedule(context: dg.ScheduleEvaluationContext):
    """03:30: one run for the stale or missing shared assets and one per target partition with stale or missing
    assets, each selecting only those; nothing when everything is up to date."""
    graph = context.repository_def.asset_graph
    requests = stale_run_requests(context.instance, graph, f"{context.scheduled_execution_time:%Y-%m-%d}")
    return requests or dg.SkipReason("every asset partition is up to date")


@dg.op(pool=WRITER_POOL)
def optimize_embeddings(context: dg.OpExecutionContext, idistill: IdistillResource) -> None:
    """Compact LanceDB files and prune old versions; shares the writers' pool so it never races a write."""
    result = idistill.store().optimize()
    context.log.info("LanceDB optimize: %s", result)


@dg.op(pool=WRITER_POOL)
def prune_artifact_versions(context: dg.OpExecutionContext, idistill: IdistillResource) -> None:
    """Delete artefact versions beyond `orchestration.keep_versions` (never the current one)."""
    removed = idistill.prune_versions()
    context.log.info(
        "retention: removed %d old artefact versions: %s", len(removed), [str(p) for p in removed]
    )


def collect_coefficient_garbage(res: IdistillResource, older_than=None) -> dict:
    """Drop the propagation coefficient tables other than the current one (the propagation's recorded table) that
    nothing wrote to for ``older_than`` (default 7 days: a target run that opened one may still read it), and prune
    the current table's old versions (issue 24: tables are keyed by content, so a stale one is never read again)."""
    from idistill_assets.upstream import propagation_path
    from idistill_core.pipeline.propagation import CoefficientTable
    from idistill_core.store import artifacts

    uri, keep = str(res.settings.lancedb_uri), []
    if propagation_path(res).exists():
        state = artifacts.read_json(propagation_path(res))
        uri, keep = state["uri"], [state["table"]]
    elif not res.settings.lancedb_uri.exists():
        return {"dropped": [], "kept": [], "versions_pruned": 0, "bytes_freed": 0}
    return CoefficientTable.collect_garbage(uri, keep, older_than)


@dg.op(pool=WRITER_POOL)
def collect_coefficient_tables(context: dg.OpExecutionContext, idistill: IdistillResource) -> None:
    """Drop stale propagation coefficient tables and prune the current one's old versions (writers' pool)."""
    result = collect_coefficient_garbage(idistill)
    context.log.info("coefficient tables: %s", result)


@dg.job(
    description="Weekly maintenance: LanceDB compaction + old-version cleanup, stale coefficient tables dropped, "
    "artefact retention."
)
def lancedb_maintenance_job():
    optimize_embeddings()
    collect_coefficient_tables()
    prune_artifact_versions()


weekly_maintenance_schedule = dg.ScheduleDefinition(
    job=lancedb_maintenance_job, cron_schedule="0 4 * * 0", default_status=dg.DefaultScheduleStatus.STOPPED
)
