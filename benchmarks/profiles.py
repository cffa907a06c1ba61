"""Sizes of every benchmark per profile; each benchmark's JSON records the parameters it ran with.

The machine is shared and its speed varies 3-14x with other jobs (measured here: JVP embedding 0.09-0.8 s
and exact gradient 0.5-7 s per sample on the default model), so ``full`` gives the expensive benchmarks a
time budget instead of fixed sizes: end_to_end embeds up to 2,000 samples and times up to 256 landmark + 244
held-out exact gradients, shrinking pool, L and held-out count to what fits 13 minutes (the JSON records
what was reached); the landmark sweep adds landmarks up to L = 1024 while its 3-minute budget lasts; scaling
drops a pool size whose projected time would overrun 5 minutes. The whole suite then stays under 30 minutes.
``extended`` has no budgets (the issue's sizes; over an hour on 2 cores). ``smoke`` runs everything on the
tiny random model (the tests).
"""

from __future__ import annotations

from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"
TARGETS = ["arith", "reading", "mcq"]
# The main job's recipe (profiles/default.yaml): D = 1024, down_proj gradients SRHT-projected to 8192.
# the JVP embedding alone, as the published figures of these benchmarks were measured (EmbedConfig.hidden's default,
# `final`, adds one decoder forward per sample: benchmarks.quality measures what it buys)
DEFAULT_EMBED = {"num_blocks": 4, "num_tangents": 2, "proj_dim": 1024, "batch_size": 8, "hidden": "none"}
# Scaling is about growth in N, not JVP cost: one block and batches of 32 keep 26k tiny-model samples ~2 min.
SCALING_EMBED = {"num_blocks": 1, "num_tangents": 2, "proj_dim": 1024, "batch_size": 32, "hidden": "none"}

FULL: dict[str, dict[str, Any]] = {
    "jvp_cost": {
        "model": DEFAULT_MODEL,
        "device": "cpu",
        "seq_lens": [128, 512],
        "batch_sizes": {"128": 8, "512": 2},
        "repeats": 3,
        "warmup": 1,
        "num_blocks": 4,
        "num_tangents": 2,
        "proj_dim": 1024,
        "variants": ["loop", "bf16"],
    },
    "end_to_end": {
        "model": DEFAULT_MODEL,
        "device": "cpu",
        "pool_size": 2000,
        "extrapolate_to": 10_000,
        "num_landmarks": 256,
        "num_holdout": 244,
        "targets": TARGETS,
        "target_examples": 8,
        "max_length": 192,
        "budget_fraction": 0.1,
        "embed": DEFAULT_EMBED,
        "gradients": {},
        "propagate": {},
        "breakdown_samples": 8,
        "time_budget_s": 780,
        "embed_share": 0.25,
    },
    "landmark_sweep": {
        "model": DEFAULT_MODEL,
        "device": "cpu",
        "pool_size": 2000,
        "landmarks": [32, 64, 128, 256, 512, 1024],
        "num_holdout": 244,
        "targets": TARGETS,
        "target_examples": 8,
        "time_budget_s": 180,
        "max_length": 192,
        "embed": DEFAULT_EMBED,
        "gradients": {},
        "propagate": {},
    },
    "scaling": {
        "model": "tiny-llama",
        "device": "cpu",
        "pool_sizes": [1000, 5000, 20_000],
        "time_budget_s": 300,
        "num_landmarks": 64,
        "target": "arith",
        "max_length": 128,
        "budget_fraction": 0.1,
        "embed": SCALING_EMBED,
        "gradients": {},
        "propagate": {},
    },
    "propagation": {
        "pool_size": 100_000,
        "num_landmarks": 4096,
        "dim": 1024,
        "num_targets": 3,
        "examples_per_target": 100,
        "chunk_size": 4096,
        "kernel": "rbf",
        "ridge": 0.01,
        "clusters": 64,
        "noise": 0.5,
    },
    "gpu": {"size": "cpu-check", "device": "cpu"},
}

SMOKE: dict[str, dict[str, Any]] = {
    "jvp_cost": {
        "model": "tiny-llama",
        "device": "cpu",
        "seq_lens": [16, 32],
        "batch_sizes": {"16": 2, "32": 2},
        "repeats": 2,
        "warmup": 1,
        "num_blocks": 4,
        "num_tangents": 2,
        "proj_dim": 32,
        "variants": ["loop", "bf16"],
    },
    "end_to_end": {
        "model": "tiny-llama",
        "device": "cpu",
        "pool_size": 64,
        "extrapolate_to": 10_000,
        "num_landmarks": 16,
        "num_holdout": 16,
        "targets": TARGETS,
        "max_length": 256,
        "budget_fraction": 0.1,
        "embed": {**DEFAULT_EMBED, "proj_dim": 32},
        "gradients": {"proj_dim": 512},
        "propagate": {},
        "breakdown_samples": 4,
        "time_budget_s": 300,
    },
    "landmark_sweep": {
        "model": "tiny-llama",
        "device": "cpu",
        "pool_size": 64,
        "landmarks": [4, 8, 16, 32],
        "num_holdout": 16,
        "targets": TARGETS,
        "max_length": 256,
        "embed": {**DEFAULT_EMBED, "proj_dim": 32},
        "gradients": {"proj_dim": 512},
        "propagate": {},
    },
    "scaling": {
        "model": "tiny-llama",
        "device": "cpu",
        "pool_sizes": [40, 80],
        "num_landmarks": 8,
        "target": "arith",
        "max_length": 128,
        "budget_fraction": 0.1,
        "embed": {**SCALING_EMBED, "proj_dim": 32},
        "gradients": {"proj_dim": 512},
        "propagate": {},
    },
    "propagation": {
        "pool_size": 3000,
        "num_landmarks": 256,
        "dim": 64,
        "num_targets": 3,
        "examples_per_target": 10,
        "chunk_size": 1024,
        "kernel": "rbf",
        "ridge": 0.01,
        "clusters": 16,
        "noise": 0.5,
    },
    "gpu": {"size": "cpu-check", "device": "cpu"},
}

# Benchmark 6 (benchmarks/gpu.py): benchmarks 1 and 2 at a larger model size. "gpu" is for a lent GPU machine;
# "cpu-check" is the same code at tiny sizes, run by every suite so the script cannot rot.
GPU_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "gpu": {
        "jvp_cost": {
            "model": "random-llama-1b",
            "seq_lens": [128, 512, 2048],
            "batch_sizes": {"128": 32, "512": 16, "2048": 4},
            "repeats": 5,
            "warmup": 2,
            "num_blocks": 4,
            "num_tangents": 2,
            "proj_dim": 4096,
            "variants": ["loop", "bf16"],
        },
        "end_to_end": {
            "model": "random-llama-1b",
            "pool_size": 5000,
            "extrapolate_to": 10_000,
            "num_landmarks": 256,
            "num_holdout": 256,
            "targets": TARGETS,
            "max_length": 256,
            "budget_fraction": 0.1,
            "embed": {"num_blocks": 4, "num_tangents": 2, "proj_dim": 4096, "batch_size": 32, "hidden": "none"},
            "gradients": {"proj_dim": 8192},
            "propagate": {},
        },
    },
    "cpu-check": {
        "jvp_cost": {
            "model": "tiny-llama",
            "seq_lens": [32],
            "batch_sizes": {"32": 2},
            "repeats": 1,
            "warmup": 1,
            "num_blocks": 2,
            "num_tangents": 2,
            "proj_dim": 32,
            "variants": [],
        },
        "end_to_end": {
            "model": "tiny-llama",
            "pool_size": 40,
            "extrapolate_to": 10_000,
            "num_landmarks": 8,
            "num_holdout": 8,
            "targets": ["arith"],
            "max_length": 256,
            "budget_fraction": 0.1,
            "embed": {**DEFAULT_EMBED, "proj_dim": 32},
            "gradients": {"proj_dim": 256},
            "propagate": {},
        },
    },
}

EXTENDED: dict[str, dict[str, Any]] = {
    **FULL,
    "end_to_end": {**FULL["end_to_end"], "target_examples": None, "time_budget_s": None},
    "landmark_sweep": {**FULL["landmark_sweep"], "target_examples": None, "time_budget_s": None},
    "scaling": {**FULL["scaling"], "pool_sizes": [1000, 2000, 5000, 10_000, 20_000], "time_budget_s": None},
}

# Extra benchmarks: run only when named with --only.
FULL["embed_dtype"] = {
    "model": DEFAULT_MODEL,
    "device": "cpu",
    "pool_size": 400,
    "num_landmarks": 96,
    "num_holdout": 96,
    "targets": TARGETS,
    "target_examples": 8,
    "max_length": 192,
    "embed": DEFAULT_EMBED,
    "gradients": {},
    "propagate": {},
    "dtypes": ["float32", "bfloat16"],
}
SMOKE["embed_dtype"] = {**SMOKE["end_to_end"], "dtypes": ["float32", "bfloat16"]}
for _key in ("extrapolate_to", "budget_fraction", "breakdown_samples", "time_budget_s"):
    SMOKE["embed_dtype"].pop(_key, None)
SMOKE["embed_dtype"]["target_examples"] = None
EXTENDED["embed_dtype"] = FULL["embed_dtype"]

# Benchmark (benchmarks/scale.py): the data plane at N = 100k and 1M, synthetic embeddings, L = 1024 (issue 11).
FULL["scale"] = {"sizes": [100_000, 1_000_000], "num_landmarks": 1024, "targets": 3, "seed": 0}
SMOKE["scale"] = {"sizes": [2_000], "num_landmarks": 64, "targets": 3, "seed": 0}
EXTENDED["scale"] = FULL["scale"]

PROFILES = {"full": FULL, "smoke": SMOKE, "extended": EXTENDED}
ORDER = ["jvp_cost", "end_to_end", "landmark_sweep", "scaling", "propagation", "gpu"]
EXTRA = ["embed_dtype", "scale", "landmark_strategies", "second_order_memory"]
FULL["landmark_strategies"] = {}  # its own DEFAULTS (benchmarks/landmark_strategies.py)
EXTENDED["landmark_strategies"] = {}

# Benchmark (benchmarks/second_order_memory.py): sketched second-order terms + the pool QP, peak RSS (issue 11).
FULL["second_order_memory"] = {}  # its own DEFAULTS: the default model, L = 8, T = 2, the main job's gradients
EXTENDED["second_order_memory"] = {"num_landmarks": 512}  # also writes second_order_peak_rss_gib_l512 to scale.json
SMOKE["second_order_memory"] = {
    "model": "tiny-llama",
    "num_landmarks": 4,
    "target_examples": 2,
    "max_length": 128,
    "gradients": {"param_subset": "down_proj", "proj_type": "srht", "proj_dim": 512},
    "qp_pool_size": 2000,
}
