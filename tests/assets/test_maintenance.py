"""The weekly maintenance job drops stale propagation coefficient tables (issue 24): tables are keyed by content, so
one the propagation no longer records is never read again once its readers are done."""

from datetime import timedelta

import lancedb
import numpy as np

from idistill_assets.defs.automation import collect_coefficient_garbage, lancedb_maintenance_job
from idistill_assets.resources import IdistillResource
from idistill_assets.upstream import propagation_path
from idistill_core.pipeline.propagation import build_coefficients
from idistill_core.steps.propagate import PropagateConfig
from idistill_core.store import artifacts
from idistill_core.store.lance import EmbeddingStore, StoreIdentity

from .conftest import write_profile


def test_maintenance_drops_coefficient_tables_the_propagation_no_longer_records(tmp_path):
    res = IdistillResource(profile=str(write_profile(tmp_path)))
    assert res.settings.lancedb_uri.exists() is False
    assert collect_coefficient_garbage(res)["dropped"] == []  # nothing materialized yet: nothing to do
    store = EmbeddingStore.open(res.settings.lancedb_uri, "emb", StoreIdentity("m", "r", 4))
    ids = [f"s{i:03d}" for i in range(60)]
    store.insert_missing(ids, np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32))
    stale, _ = build_coefficients(store, ids, ids[:8], PropagateConfig(ridge=0.05))
    current, report = build_coefficients(store, ids, ids[:8], PropagateConfig())
    artifacts.write_json(propagation_path(res), {"uri": store.uri, "table": current.name, "version": report.version})

    assert collect_coefficient_garbage(res)["dropped"] == []  # both written within the week
    result = collect_coefficient_garbage(res, older_than=timedelta(0))
    assert result["dropped"] == [stale.name] and result["kept"] == [current.name]
    assert set(lancedb.connect(store.uri).list_tables().tables) == {"emb", current.name}
    assert "collect_coefficient_tables" in lancedb_maintenance_job.graph.node_dict
