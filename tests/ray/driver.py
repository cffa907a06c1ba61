"""A Ray driver process for the tests: embeds the tiny built-in pool into a LanceDB table on the Ray backend.

    python -m tests.ray.driver POOL_DIR STORE_DIR RAY_ADDRESS NUM_ACTORS

Prints ``commit <rows>`` after each LanceDB commit and ``done <computed> <already_present>`` at the end, so a
test can kill it between commits and check what a re-run computes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from idistill_core.backends import BackendConfig, ModelSource
from idistill_core.steps.embed import EmbedConfig

EMBED = EmbedConfig(num_blocks=2, num_tangents=2, proj_dim=64, batch_size=8)
COMMIT_EVERY = 8
SAMPLES_PER_TASK = 8
MAX_LENGTH = 192


def tiny_pool(folder: Path):
    """(LoadedModel, tokenized examples) of the 120-sample built-in pool written to ``folder``."""
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.data.rows import load_rows
    from idistill_core.models.loading import load_model

    loaded = load_model("tiny-llama", attn_implementation="eager")
    return loaded, tokenize_rows(load_rows(str(folder / "pool.jsonl")), loaded.tokenizer, MAX_LENGTH).examples


def open_table(store: Path, loaded):
    from idistill_core.pipeline.embeddings import open_store
    from idistill_core.pipeline.recipe import SelectionRecipe

    recipe = SelectionRecipe(max_length=MAX_LENGTH, embed=EMBED)
    return open_store(store, "embeddings", loaded.fingerprint, recipe, loaded.model.config.hidden_size)


def ray_backend(address: str | None, actors: int) -> BackendConfig:
    return BackendConfig(
        name="ray", ray_address=address, num_actors=actors, samples_per_task=SAMPLES_PER_TASK
    )


def main(argv: list[str]) -> int:
    from idistill_core.pipeline.embeddings import embed_pool

    pool_dir, store_dir, address, actors = Path(argv[0]), Path(argv[1]), argv[2], int(argv[3])
    loaded, examples = tiny_pool(pool_dir)
    store = open_table(store_dir, loaded)
    report = embed_pool(
        loaded.model,
        loaded.tokenizer,
        examples,
        store,
        EMBED,
        commit_every=COMMIT_EVERY,
        on_commit=lambda done, total: print(f"commit {done}", flush=True),
        backend=ray_backend(address, actors),
        source=ModelSource.of(loaded),
    )
    print(f"done {report.computed} {report.already_present}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
