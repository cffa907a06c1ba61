"""Where each shared artefact lives and how a downstream asset body (or the Ray driver) reads it.

The asset bodies in ``defs/`` and the job-submission driver (``ray_job``) both read the pool, the warmed model,
the landmarks and the propagation coefficients through these helpers, so neither imports the other.
"""


from idistill_assets.resources import IdistillResource
from idistill_core.store import artifacts


def source_counts(frame) -> dict[str, int]:
    """Samples per ``source`` (a parquet path or a polars frame), most frequent first (polars ``value_counts``)."""
    import polars as pl

    column = (pl.scan_parquet(frame) if not isinstance(frame, pl.DataFrame) else frame.lazy()).select("source")
    counts = column.collect()["source"].value_counts(sort=True)
    return dict(zip(counts["source"].to_list(), counts["count"].to_list()))


def pool_path(res: IdistillResource):
    """The pool parquet of the latest materialization (a versioned folder, see resources.py)."""
    return res.current("pool") / "pool.parquet"


def load_pool_rows(res: IdistillResource):
    from idistill_core.data.rows import load_rows

    return load_rows(str(pool_path(res)), fmt="chat")


def tokenized_pool(res: IdistillResource, tokenizer):
    """The pool tokenized with the recipe's max length (``TokenizeResult``)."""
    from idistill_core.data.chat import tokenize_rows

    recipe = res.settings.recipe
    return tokenize_rows(load_pool_rows(res), tokenizer, recipe.max_length, on_overflow=recipe.on_overflow)


def embedded_pool_path(res: IdistillResource):
    return res.artifact_dir("embeddings") / "pool_ids.parquet"


def write_embedded_pool(res: IdistillResource, pool_ids: list[str], lance_version: int, table: str) -> None:
    """Record which pool the embeddings materialization covered and the Lance version it left the table at."""
    import pyarrow as pa

    meta = {b"lance_version": str(lance_version).encode(), b"table": table.encode()}
    artifacts.write_parquet(embedded_pool_path(res), pa.table({"sample_id": pa.array(pool_ids, pa.string())}).replace_schema_metadata(meta))


def embedded_pool(res: IdistillResource):
    """(pool ids as an Arrow array, the store pinned at the Lance version the embeddings materialization recorded).

    Downstream assets score exactly this pool and read its vectors at that version (time travel), so neither rows
    of other pools sharing the table nor a concurrent append can reach them.
    """
    import pyarrow.parquet as pq

    table = pq.read_table(embedded_pool_path(res))
    version = int(table.schema.metadata[b"lance_version"])
    return table.column("sample_id").combine_chunks(), res.store().at_version(version)


def warmup_dir(res: IdistillResource):
    """The latest warm-up version's folder (state.json, model/, preconditioner)."""
    return res.current("warmup")


def gradient_model(res: IdistillResource):
    """(model, tokenizer, preconditioner or None): the warmed model when warm-up is enabled."""
    from idistill_core.models.loading import load_model
    from idistill_core.steps.warmup import AdamPreconditioner

    state = artifacts.read_json(warmup_dir(res) / "state.json")
    loaded = res.load_model()
    if not state.get("enabled"):
        return loaded.model, loaded.tokenizer, None
    warmed = load_model(str(warmup_dir(res) / "model"))
    arrays, meta = artifacts.load_arrays(warmup_dir(res) / "preconditioner.safetensors")
    import torch

    a = {k[3:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("a::")}
    b = {k[3:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("b::")}
    return warmed.model, loaded.tokenizer, AdamPreconditioner(a=a, b=b, lr=meta["lr"], step=meta.get("step"))


def landmarks_path(res: IdistillResource):
    """The landmark gradients of the latest materialization (a versioned folder)."""
    return res.current("landmarks") / "landmarks.safetensors"


def load_landmarks(res: IdistillResource):
    arrays, meta = artifacts.load_arrays(landmarks_path(res))
    return meta["landmark_ids"], arrays["landmarks"], meta["holdout_ids"], arrays["holdout"]


def propagation_path(res: IdistillResource):
    return res.artifact_dir("propagation") / "coefficients.json"


def load_propagation(res: IdistillResource):
    """The shared coefficient table, opened at the Lance version the propagation materialization recorded."""
    from idistill_core.pipeline.propagation import CoefficientTable

    state = artifacts.read_json(propagation_path(res))
    return CoefficientTable.open(state["uri"], state["table"], state["version"])


def rds_target_names(res: IdistillResource) -> list[str]:
    """Registered targets whose YAML says ``method: rds`` (a target file that does not validate is left to its
    own partition to report)."""
    from idistill_core.errors import ConfigError
    from idistill_core.project.targets import load_target_spec

    folder = res.settings.targets_dir
    names = []
    for path in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")) if folder.is_dir() else []:
        try:
            spec = load_target_spec(path, res.settings.data_roots)
        except ConfigError:
            continue
        if spec.method == "rds":
            names.append(spec.name)
    return names


def rds_store(res: IdistillResource):
    """The RDS+ feature table of the base model at the profile's max length (``pipeline.open_rds_store``)."""
    from idistill_core.pipeline.embeddings import open_rds_store

    loaded = res.load_model()
    return open_rds_store(
        res.settings.lancedb_uri, loaded.fingerprint, res.settings.recipe.max_length, loaded.model.config.hidden_size
    )


def fill_rds_features(res: IdistillResource, examples, on_commit=None):
    """Compute the RDS+ features of the pool samples the table lacks (none once `rds_features` ran for this pool)."""
    from idistill_core.pipeline.embeddings import embed_rds_pool

    loaded = res.load_model()
    store = rds_store(res)
    report = embed_rds_pool(
        loaded.model, loaded.tokenizer, examples, store, res.settings.recipe.batch_size,
        commit_every=res.settings.commit_every, on_commit=on_commit,
    )
    return store, report
