"""The kernel-selection report of a hand-made grid (issue 25, the mutmut survivors of ``steps/kernel_select.py``
listed in docs/mutation-testing.md): a grid point missing from a row is an empty cell, not an error."""

from __future__ import annotations

from idistill_core.steps.kernel_select import CVPoint, KernelSelection
from idistill_core.steps.propagate import PropagateConfig


def test_markdown_leaves_a_missing_grid_point_empty_and_bolds_the_best():
    grid = (
        CVPoint("rbf", 1.0, 0.1, 0.5),
        CVPoint("rbf", 1.0, 0.01, 0.25),
        CVPoint("linear", None, 0.1, 0.75),  # no linear point at ridge 0.01
    )
    sel = KernelSelection(PropagateConfig(ridge=0.01), 2.0, 2.0, grid, 4, 0, 10)
    lines = [
        "| kernel | bandwidth × median | ridge 0.01 | ridge 0.1 |",
        "|---|---|---|---|",
        "| rbf | 1 | **0.2500** | 0.5000 |",
        "| linear |  |  | 0.7500 |",
    ]
    assert sel.markdown().split("\n") == lines
