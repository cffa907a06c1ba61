"""One-off studies: measurements behind a decision, run by hand, not part of the suite (``benchmarks/run.py``).

Each is ``python -m benchmarks.studies.<name>``, writes ``benchmarks/results/<name>.json`` and is described with
its command and figures in BENCHMARKS.md. ``legacy_finetune_loop`` is not a study: it is the frozen hand-written
fine-tune loop that ``finetune_trl`` and ``tests/core/test_train.py`` compare the TRL path against.
"""
