"""Selection quality on real data, all three stages: ``python -m benchmarks.quality``.

Builds the pool and targets (``realdata``: skipped when ``.idistill/realdata/manifest.json`` exists), computes the
cached features (``features``: every pool sample's exact gradient, about two hours on one CPU thread of a 2-core
EPYC; reused when the recipe's folder exists) and runs the comparison (``run``), which writes
``benchmarks/results/quality.json``. Each stage also runs on its own with its own options.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.quality import features, realdata, run


def main() -> int:
    if not Path(".idistill/realdata/manifest.json").exists() and realdata.main([]) != 0:
        return 2
    features.main([])
    return run.main([])


if __name__ == "__main__":
    sys.exit(main())
