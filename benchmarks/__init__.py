"""Benchmarks of idistill's cost and fidelity claims (issue 7); run them all with ``python -m benchmarks.run``.

Every figure is a ratio or a rate measured within one run (medians over repeats where a measurement is cheap
enough to repeat); the shared CPU machine is too noisy for absolute times to mean much across runs. Each
benchmark prints a table and writes ``benchmarks/results/<name>.json`` (parameters, machine, figures).

Modules: ``jvp_cost`` (1), ``end_to_end`` (2), ``landmark_sweep`` (3), ``scaling`` (4), ``propagation`` (5),
``gpu`` (6, the prepared GPU script); ``common`` (machine info, child processes, JSON) and ``profiles`` (sizes).
"""
