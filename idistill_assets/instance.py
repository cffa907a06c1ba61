"""Prepare the project's Dagster instance for a profile (``make ui`` runs this before ``dagster dev``):

    python -m idistill_assets.instance --profile profiles/default.yaml

writes ``<home>/dagster_home/dagster.yaml`` (run queue and pools sized to the devices; telemetry and Dagster's
first-visit "Join the Dagster community" dialog turned off, so the UI opens on the asset graph) and sets the pool
limits.
"""

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default=os.environ.get("IDISTILL_PROFILE", "profiles/default.yaml"))
    parser.add_argument("--home", default=None)
    args = parser.parse_args(argv)
    from idistill_assets.main import _instance
    from idistill_core.project.settings import load_settings

    settings = load_settings(args.profile, args.home)
    _instance(settings)
    print(f"instance ready: {settings.home / 'dagster_home' / 'dagster.yaml'} (no telemetry, no onboarding dialog)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
