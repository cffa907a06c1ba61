"""The paper's steps over stored artefacts (the LanceDB store, gradient shards), shared by the CLI and the assets.

``recipe`` (every knob), ``embeddings`` (step 1 into the store), ``landmarks`` and ``gradients`` (step 2),
``propagation`` (step 4's coefficient table and fidelity), ``second_order`` (step 3's QP glue), ``selection``
(step 5's outcome) and ``run`` (:func:`~idistill_core.pipeline.run.run_selection`, the short composer that hands a
resolved recipe to its method in :mod:`idistill_core.methods`).
"""
