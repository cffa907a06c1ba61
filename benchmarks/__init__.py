"""Benchmarks of idistill's cost and fidelity claims; run the suite with ``python -m benchmarks.run``.

Every figure is a ratio or a rate measured within one run (medians over repeats where a measurement is cheap
enough to repeat); the shared CPU machine is too noisy for absolute times to mean much across runs. Each
benchmark prints a table and writes ``benchmarks/results/<name>.json`` (parameters, machine, figures).

The suite (registered in ``profiles.py``, run by ``run.py``): ``jvp_cost`` (1), ``end_to_end`` (2),
``landmark_sweep`` (3), ``scaling`` (4), ``propagation`` (5), ``gpu`` (6, the prepared GPU script); extras run
with ``--only``: ``embed_dtype``, ``scale``, ``landmark_strategies``, ``second_order_memory``. Plumbing:
``common`` (machine info, child processes, timers, models and data, JSON, tables), ``workload`` (the pool,
targets, embeddings and exact gradients that 2, 3 and 6 share), ``profiles`` (sizes), ``report`` (tables).
One-off studies run by hand live in ``studies/``; ``quality/`` measures selection quality on real data.
"""
