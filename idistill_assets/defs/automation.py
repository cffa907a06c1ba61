"""Jobs, the target-registry sensor, the daily refresh schedule and the weekly LanceDB maintenance job."""


import json

import dagster as dg

from idistill_assets.defs.shared import PREFIX
from idistill_assets.partitions import targets
from idistill_assets.resources import IdistillResource

DATA_VERSION_TAG = "dagster/data_version"

shared_job = dg.define_asset_job(
    "shared_job",
    selection=dg.AssetSelection.groups("shared"),
    description="Pool, base model, embeddings (incremental), warm-up and landmarks: everything targets share.",
)
target_job = dg.define_asset_job(
    "target_job",
    selection=dg.AssetSelection.groups("target") - dg.AssetSelection.keys(dg.AssetKey([PREFIX, "target_spec"])),
    description="Everything of one target partition: gradients → influence → weights → subset → fine-tune → eval.",
)
selection_job = dg.define_asset_job(
    "selection_job",
    selection=dg.AssetSelection.keys(
        *[dg.AssetKey([PREFIX, k]) for k in ("target_gradients", "landmark_influence", "propagated_weights", "selected_subset")]
    ),
    description="Selection only (no fine-tuning) for one target partition.",
)


def registry_versions(res: IdistillResource) -> dict[str, str]:
    from idistill_core.targets import load_registry

    specs = load_registry(res.settings.targets_dir, res.settings.data_roots)
    return {name: spec.version() for name, spec in specs.items()}


def registry_tick(current: dict[str, str], known_partitions: set[str], cursor: str | None) -> dg.SensorResult | dg.SkipReason:
    """Pure decision of one sensor tick: partitions to add/remove, runs for new or changed targets."""
    previous = json.loads(cursor) if cursor else {}
    added = sorted(set(current) - known_partitions)
    removed = sorted(known_partitions - set(current))
    changed = sorted(k for k in current if k in previous and previous[k] != current[k])
    fresh = sorted(k for k in current if k not in previous)
    to_run = sorted(set(changed) | set(fresh))
    if not (added or removed or to_run):
        return dg.SkipReason(f"target registry unchanged ({len(current)} targets)")
    requests = []
    if added:
        requests.append(targets.build_add_request(added))
    if removed:
        requests.append(targets.build_delete_request(removed))
    observations = [
        dg.AssetObservation(
            asset_key=dg.AssetKey([PREFIX, "target_spec"]), partition=name, tags={DATA_VERSION_TAG: current[name]}
        )
        for name in to_run
    ]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=name, run_key=f"{name}:{current[name]}") for name in to_run],
        dynamic_partitions_requests=requests,
        asset_events=observations,
        cursor=json.dumps(current, sort_keys=True),
    )


@dg.sensor(job=target_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED)
def target_registry_sensor(context: dg.SensorEvaluationContext, idistill: IdistillResource):
    """Syncs targets/*.yaml to the `targets` partitions and requests runs for new or edited targets only."""
    known = set(context.instance.get_dynamic_partitions(targets.name))
    return registry_tick(registry_versions(idistill), known, context.cursor)


@dg.schedule(job=shared_job, cron_schedule="0 3 * * *", default_status=dg.DefaultScheduleStatus.STOPPED)
def daily_refresh_schedule(context: dg.ScheduleEvaluationContext):
    """Daily: refresh the pool, embed new rows (incremental) and recompute landmarks; `shared_inputs_sensor` then
    re-runs the target partitions only if the embeddings or landmarks got a new data version."""
    return dg.RunRequest(run_key=f"refresh-{context.scheduled_execution_time:%Y-%m-%d}")


@dg.op(pool="lancedb_writer")
def optimize_embeddings(context: dg.OpExecutionContext, idistill: IdistillResource) -> None:
    """Compact LanceDB files and prune old versions; shares the writers' pool so it never races a write."""
    result = idistill.store().optimize()
    context.log.info("LanceDB optimize: %s", result)


@dg.job(description="Weekly LanceDB maintenance (compaction + old-version cleanup).")
def lancedb_maintenance_job():
    optimize_embeddings()


weekly_maintenance_schedule = dg.ScheduleDefinition(
    job=lancedb_maintenance_job, cron_schedule="0 4 * * 0", default_status=dg.DefaultScheduleStatus.STOPPED
)


SHARED_INPUTS = [dg.AssetKey([PREFIX, "embeddings"]), dg.AssetKey([PREFIX, "landmarks"])]


def shared_versions(instance: dg.DagsterInstance) -> dict[str, str]:
    """Latest data version of each shared input of the target assets ('' when never materialized)."""
    versions = {}
    for key in SHARED_INPUTS:
        event = instance.get_latest_materialization_event(key)
        tags = (event.asset_materialization.tags or {}) if event and event.asset_materialization else {}
        versions[key.to_user_string()] = tags.get(DATA_VERSION_TAG, "")
    return versions


def shared_inputs_tick(current: dict[str, str], partitions: list[str], cursor: str | None):
    """Run every target partition when the embeddings or landmarks got a new data version (not just re-ran)."""
    previous = json.loads(cursor) if cursor else None
    if previous is None:
        return dg.SensorResult(cursor=json.dumps(current, sort_keys=True))
    if previous == current or not all(current.values()):
        return dg.SkipReason("shared inputs unchanged")
    version = "-".join(current[k] for k in sorted(current))[:48]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=p, run_key=f"{p}:shared:{version}") for p in sorted(partitions)],
        cursor=json.dumps(current, sort_keys=True),
    )


@dg.sensor(job=target_job, minimum_interval_seconds=120, default_status=dg.DefaultSensorStatus.STOPPED)
def shared_inputs_sensor(context: dg.SensorEvaluationContext):
    """After the daily refresh, re-runs target partitions only if the embeddings or landmarks really changed."""
    partitions = context.instance.get_dynamic_partitions(targets.name)
    return shared_inputs_tick(shared_versions(context.instance), partitions, context.cursor)
