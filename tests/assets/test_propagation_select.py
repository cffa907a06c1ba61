"""The shared propagation asset with CV-chosen kernel and ridge reports the chosen values and the CV grid."""

import dagster as dg

from idistill_assets.definitions import build_definitions

from .conftest import write_profile
from .test_pipeline import key, run_shared


def test_propagation_metadata_reports_the_cv_choice(tmp_path, instance):
    profile = write_profile(tmp_path, propagate={"kernel": "auto", "ridge": "auto", "bandwidth_grid": [0.5, 1.0, 2.0]})
    run_shared(build_definitions(str(profile)), instance)
    record = instance.fetch_materializations(key("propagation"), limit=1).records[0]
    meta = record.asset_materialization.metadata
    assert meta["kernel_selection"].value == "cv"
    assert meta["kernel"].value in ("rbf", "linear")
    assert meta["ridge"].value in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    assert isinstance(meta["cv_grid"], dg.MarkdownMetadataValue) and "**" in meta["cv_grid"].value
    assert 0 <= meta["cv_error"].value < 2
