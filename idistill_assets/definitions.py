"""The idistill code location: every asset, check, job, sensor and schedule, wired to one settings profile.

The profile is chosen by ``IDISTILL_PROFILE`` (default ``profiles/default.yaml``) when the code location loads.
"""

from __future__ import annotations

import os

import dagster as dg

from idistill_assets.defs import automation, finetune, mixes, shared, targets
from idistill_assets.resources import IdistillResource
from idistill_core.errors import ConfigError


def build_definitions(profile: str | None = None, home: str | None = None) -> dg.Definitions:
    resource = IdistillResource(
        profile=profile or os.environ.get("IDISTILL_PROFILE", "profiles/default.yaml"),
        home=home or os.environ.get("IDISTILL_HOME") or None,
    )
    try:
        settings = resource.settings
    except ConfigError:
        # a broken profile still loads the code location; the first run then fails with the one-line error
        settings = None
    assets = [
        shared.pool,
        shared.base_model,
        shared.embeddings,
        shared.warmup,
        shared.landmarks,
        shared.propagation,
        shared.rds_features,
        targets.target_spec,
        targets.target_gradients,
        targets.landmark_influence,
        targets.propagated_weights,
        targets.selected_subset,
        finetune.finetuned_checkpoint,
        finetune.random_checkpoint,
        finetune.eval_scores,
        mixes.mix_spec,
        mixes.mixed_subset,
    ]
    return dg.Definitions(
        assets=automation.with_profile(assets, settings),
        asset_checks=[targets.target_registry_valid, mixes.mix_registry_valid],
        jobs=[
            automation.shared_job,
            automation.target_job,
            automation.selection_job,
            automation.mix_job,
            automation.refresh_job,
            automation.lancedb_maintenance_job,
        ],
        sensors=[automation.target_registry_sensor, automation.mix_registry_sensor, *automation.automation_sensors(settings)],
        schedules=[
            automation.daily_refresh_schedule,
            automation.daily_stale_schedule,
            automation.weekly_maintenance_schedule,
        ],
        resources={"idistill": resource},
        executor=dg.in_process_executor,
    )


defs = build_definitions()
