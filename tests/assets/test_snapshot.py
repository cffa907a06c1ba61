"""A snapshot of the code location's structure: asset keys, deps, partitions, pools, checks, jobs, schedules
and sensors. A change to any of them shows in review as a diff of tests/assets/definitions_snapshot.json.

Regenerate after an intended change with:  IDISTILL_UPDATE_SNAPSHOT=1 pytest tests/assets/test_snapshot.py
"""

import json
import os
from pathlib import Path

from idistill_assets.definitions import build_definitions

SNAPSHOT = Path(__file__).with_name("definitions_snapshot.json")


def structure(defs) -> dict:
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "partitions": getattr(node.partitions_def, "name", None),
            "group": node.group_name,
            "pools": sorted(node.pools or []) if hasattr(node, "pools") else None,
            "automated": node.automation_condition is not None,
            "checks": sorted(k.name for k in node.check_keys),
        }
    return {
        "assets": assets,
        "jobs": sorted(j.name for j in defs.jobs),
        "schedules": {s.name: s.cron_schedule for s in sorted(defs.schedules, key=lambda s: s.name)},
        "sensors": {s.name: s.default_status.value for s in sorted(defs.sensors, key=lambda s: s.name)},
    }


def test_definitions_match_the_reviewed_snapshot():
    current = structure(build_definitions("profiles/tiny.yaml"))
    if os.environ.get("IDISTILL_UPDATE_SNAPSHOT"):
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text()), "definitions changed: review, then regenerate (see docstring)"
