"""Target-independent assets: the pool, the base model, JVP embeddings (LanceDB), warm-up, landmarks.

These are computed once and reused by every target partition.
"""


import time

import dagster as dg
import numpy as np

from idistill_assets import plots
from idistill_assets.progress import eta_logger
from idistill_assets.resources import DEVICE_POOL, IdistillResource
from idistill_assets.upstream import (
    embedded_pool,
    fill_rds_features,
    gradient_model,
    load_landmarks,
    propagation_path,
    rds_target_names,
    source_counts,
    tokenized_pool,
    warmup_dir,
    write_embedded_pool,
)
from idistill_core.store import artifacts
from idistill_core.store.hashing import config_fingerprint, file_hash, ids_hash, stable_hash

PREFIX = "idistill"
SHARED = "shared"


@dg.asset(
    key=[PREFIX, "pool"],
    group_name=SHARED,
    kinds={"parquet", "python"},
    code_version="pool-v1",
)
def pool(context: dg.AssetExecutionContext, idistill: IdistillResource) -> dg.MaterializeResult:
    """The training pool, normalised to the chat schema (sample_id, source, messages) as parquet."""
    from idistill_core.data.builtin import write_builtin, write_gsm8k
    from idistill_core.data.rows import load_rows
    from idistill_core.project import validate

    s = idistill.settings
    # every folder the shared assets write, probed before any work (nothing is created by the probe)
    validate.check_output_folder(s.artifacts, "artifacts folder")
    validate.check_output_folder(s.lancedb_uri, "LanceDB folder")
    if s.pool.source == "builtin":
        validate.check_output_folder(s.data_root, "data folder")
    if s.pool.source == "builtin":
        out = s.data_root / "builtin"
        summary = write_builtin(out, pool_size=s.pool.builtin_size, seed=s.pool.builtin_seed)
        context.log.info("built-in data written to %s: %s", out, summary)
        if s.pool.include_gsm8k:
            write_gsm8k(out, cache_dir=s.cache_dir, seed=s.pool.builtin_seed)
        rows = load_rows(str(out / "pool.jsonl"), fmt="chat", limit=s.pool.limit)
    else:
        rows = load_rows(s.pool.source, fmt=s.pool.format, limit=s.pool.limit, format_option="pool.format")
    staging = idistill.staging("pool")
    rows.to_parquet(str(staging / "pool.parquet"))
    version = stable_hash({"ids": ids_hash(rows["sample_id"]), "file": file_hash(staging / "pool.parquet")}, 16)
    target = idistill.commit(staging, version)[1] / "pool.parquet"
    counts = source_counts(target)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "dagster/row_count": len(rows),
            "dagster/uri": str(target),
            "sources": plots.table(
                [{"source": k, "samples": v, "share": v / len(rows)} for k, v in counts.items()],
                {"source": "string", "samples": "int", "share": "float"},
            ),
            "composition": plots.bars(counts, "pool composition", "samples"),
        },
    )


@dg.asset(key=[PREFIX, "base_model"], group_name=SHARED, kinds={"pytorch"}, code_version="model-v1")
def base_model(context: dg.AssetExecutionContext, idistill: IdistillResource) -> dg.MaterializeResult:
    """The base causal LM (resolved from the profile's model spec), identified by its weights fingerprint."""
    start = time.perf_counter()
    loaded = idistill.load_model()
    params = sum(p.numel() for p in loaded.model.parameters())
    return dg.MaterializeResult(
        data_version=dg.DataVersion(loaded.fingerprint),
        metadata={
            "spec": loaded.spec,
            "fingerprint": loaded.fingerprint,
            "architecture": type(loaded.model).__name__,
            "parameters": params,
            "layers": loaded.model.config.num_hidden_layers,
            "load_seconds": round(time.perf_counter() - start, 2),
        },
    )


@dg.asset(
    key=[PREFIX, "embeddings"],
    deps=[pool, base_model],
    group_name=SHARED,
    kinds={"lancedb", "pytorch"},
    code_version="embed-v1",
    pool="lancedb_writer",
    check_specs=[dg.AssetCheckSpec("embeddings_valid", asset=[PREFIX, "embeddings"], blocking=True)],
)
def embeddings(context: dg.AssetExecutionContext, idistill: IdistillResource) -> dg.MaterializeResult:
    """JVP embeddings of every pool sample in LanceDB; only sample ids not yet in the table are computed.

    On the profile's `ray` backend the missing ids are first computed by a Ray driver (Dagster Pipes,
    `idistill_assets.ray_job`); the local body below then finds them committed and reports as usual.
    """
    from idistill_assets.ray_job import run_on_backend
    from idistill_core.pipeline.embeddings import embed_pool

    s = idistill.settings
    loaded = idistill.load_model(attn_implementation="eager")
    tokenized = tokenized_pool(idistill, loaded.tokenizer)
    store = idistill.store()
    remote = run_on_backend(context, idistill, "embeddings")

    on_commit = eta_logger(context.log, "embeddings: committed", "new samples")

    report = embed_pool(
        loaded.model, loaded.tokenizer, tokenized.examples, store, idistill.recipe().embed,
        commit_every=s.commit_every, on_commit=on_commit,
    )
    pool_ids = list(tokenized.examples["sample_id"])
    write_embedded_pool(idistill, pool_ids, report.table_version, store.name)
    check = _check_embeddings(store, pool_ids)
    version = stable_hash({"model": loaded.fingerprint, "recipe": store.identity.recipe, "ids": ids_hash(pool_ids)}, 16)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "dagster/row_count": report.row_count,
            # LanceDB versions the table itself: this URI pins the version this materialization committed
            "dagster/uri": f"{store.uri}::{store.name}?version={report.table_version}",
            "lance_version": report.table_version,
            "inserted": report.inserted,
            "already_present": report.already_present,
            "dimension": store.identity.dim,
            "recipe": store.identity.recipe,
            "seconds": round(report.seconds, 2),
            "samples_per_second": round(report.inserted / report.seconds, 2) if report.inserted else 0.0,
            "truncated_samples": tokenized.num_truncated,
            "dropped_samples": len(tokenized.dropped_ids),
            "precision": idistill.precision(s.recipe.embed.dtype).summary(),
            "padding_fraction": round(report.padding_fraction, 4),
            **remote,
        },
        check_results=[check],
    )


def _check_embeddings(store, pool_ids: list[str]) -> dg.AssetCheckResult:
    """Row count = usable pool, ids match, dimension and dtype as declared, every value finite."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table_ids = store.id_array()
    field_type = store.vector_type
    problems = []
    if pc.count_distinct(table_ids).as_py() != len(table_ids):
        problems.append("duplicate sample ids")
    missing = int((~store.present_mask(pool_ids)).sum())
    if missing:
        problems.append(f"{missing} pool samples without an embedding")
    finite = not missing and all(np.isfinite(chunk).all() for _, chunk in store.iter_chunks(sample_ids=pool_ids))
    if not (pa.types.is_fixed_size_list(field_type) and field_type.list_size == store.identity.dim):
        problems.append(f"vector type {field_type} is not fixed_size_list[{store.identity.dim}]")
    if field_type.value_type != pa.float16():
        problems.append(f"vector dtype {field_type.value_type} is not float16")
    if not finite:
        problems.append("non-finite values")
    return dg.AssetCheckResult(
        check_name="embeddings_valid",
        passed=not problems,
        metadata={"rows": len(table_ids), "pool_samples": len(pool_ids), "problems": "; ".join(problems) or "none"},
    )


@dg.asset(
    key=[PREFIX, "warmup"], deps=[pool, base_model], group_name=SHARED, kinds={"pytorch"}, code_version="warmup-v1",
    pool=DEVICE_POOL,
)
def warmup(context: dg.AssetExecutionContext, idistill: IdistillResource) -> dg.MaterializeResult:
    """A warmed-up copy of the model and its Adam preconditioner (paper §1.6); skipped when optimizer is 'gd'."""
    import copy

    from idistill_core.pipeline.gradients import warmup_preconditioner
    from idistill_core.training.checkpoints import save_checkpoint

    s = idistill.settings
    out = idistill.staging("warmup")
    if s.recipe.optimizer != "adam":
        artifacts.write_json(out / "state.json", {"enabled": False})
        idistill.commit(out, "disabled")
        return dg.MaterializeResult(
            data_version=dg.DataVersion("disabled"), metadata={"enabled": False, "reason": "recipe.optimizer is 'gd'"}
        )
    loaded = idistill.load_model()
    tokenized = tokenized_pool(idistill, loaded.tokenizer)
    model = copy.deepcopy(loaded.model)
    start = time.perf_counter()
    pre = warmup_preconditioner(model, loaded.tokenizer, tokenized.examples, s.recipe.warmup, s.recipe.gradients.param_subset)
    seconds = time.perf_counter() - start
    save_checkpoint(model, loaded.tokenizer, out / "model")
    arrays = {f"a::{k}": v.detach().float().numpy() for k, v in pre.a.items()}
    arrays.update({f"b::{k}": v.detach().float().numpy() for k, v in pre.b.items()})
    artifacts.save_arrays(out / "preconditioner.safetensors", arrays, {"lr": pre.lr, "step": getattr(pre, "step", None)})
    version = stable_hash({"model": loaded.fingerprint, "warmup": config_fingerprint(s.recipe.warmup)}, 16)
    artifacts.write_json(out / "state.json", {"enabled": True, "version": version})
    _, final = idistill.commit(out, version)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={"dagster/uri": str(final), "enabled": True, "steps": s.recipe.warmup.steps, "seconds": round(seconds, 2), "lr": pre.lr},
    )


@dg.asset(
    key=[PREFIX, "landmarks"],
    # embeddings: the kmeanspp/kcenter/leverage strategies choose landmarks from them (lineage + staleness)
    deps=[pool, base_model, warmup, embeddings],
    group_name=SHARED,
    kinds={"pytorch", "safetensors"},
    code_version="landmarks-v1",
    pool=DEVICE_POOL,
)
def landmarks(context: dg.AssetExecutionContext, idistill: IdistillResource) -> dg.MaterializeResult:
    """Landmark ids and their exact, projected (optionally Adam-preconditioned) gradients, plus held-out samples."""
    import shutil

    from idistill_assets.ray_job import run_on_backend
    from idistill_core.pipeline.gradients import compute_gradients_resumable
    from idistill_core.pipeline.landmarks import choose_landmarks

    s = idistill.settings
    model, tokenizer, pre = gradient_model(idistill)
    tokenized = tokenized_pool(idistill, tokenizer)
    ids = list(tokenized.examples["sample_id"])
    if s.recipe.landmarks.strategy == "adaptive":
        from idistill_core.errors import ConfigError

        raise ConfigError(
            "landmarks.strategy 'adaptive' needs a target's values between its rounds; the shared landmarks "
            "serve every target, so use it with `idistill select` (or pick another strategy here)."
        )
    # at the Lance version the embeddings materialization recorded, like every other reader of the embeddings
    emb = embedded_pool(idistill)[1].read(ids) if s.recipe.landmarks.needs_embeddings else None
    landmark_ids, holdout_ids = choose_landmarks(
        ids, s.recipe.num_landmarks, s.recipe.num_holdout, s.recipe.seed, s.recipe.landmarks, emb
    )
    # shards are keyed by everything the gradients depend on, so a re-run after a kill reuses only valid chunks
    warm = artifacts.read_json(warmup_dir(idistill) / "state.json")
    key = stable_hash(
        {
            "ids": landmark_ids + holdout_ids,
            "model": idistill.load_model().fingerprint,
            "warmup": warm.get("version", "disabled"),
            "gradients": config_fingerprint(idistill.recipe().gradients),
            "max_length": s.recipe.max_length,
        },
        16,
    )
    shard_dir = idistill.versions_dir("landmarks") / f"shards-{key}"

    on_chunk = eta_logger(context.log, "landmark gradients: committed chunk", "")

    start = time.perf_counter()
    remote = run_on_backend(context, idistill, "landmarks", ids=landmark_ids + holdout_ids, shard_dir=str(shard_dir))
    grads = compute_gradients_resumable(
        model, tokenizer, tokenized.examples, landmark_ids + holdout_ids, idistill.recipe().gradients, shard_dir,
        preconditioner=pre, chunk_size=s.commit_every, on_chunk=on_chunk,
    )
    seconds = time.perf_counter() - start
    g = grads.grads.detach().float().numpy()
    meta = {"landmark_ids": landmark_ids, "holdout_ids": holdout_ids, "gradients": config_fingerprint(s.recipe.gradients)}
    staging = idistill.staging("landmarks")
    artifacts.save_arrays(staging / "landmarks.safetensors", {"landmarks": g[: len(landmark_ids)], "holdout": g[len(landmark_ids) :]}, meta)
    # from the inputs (as the embeddings' version), not the file's bytes: float bits differ with the thread count
    # and device a backend runs on, and the version must be the same on the local and the ray backend
    version = stable_hash({"ids": landmark_ids + holdout_ids, "inputs": key}, 16)
    path = idistill.commit(staging, version)[1] / "landmarks.safetensors"
    for stale in idistill.versions_dir("landmarks").glob("shards-*"):  # this run's and any abandoned key's
        shutil.rmtree(stale, ignore_errors=True)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "landmarks": len(landmark_ids),
            "holdout": len(holdout_ids),
            "projected_dim": int(g.shape[1]),
            "preconditioned": pre is not None,
            "seconds": round(seconds, 2),
            "seconds_per_gradient": round(seconds / max(1, len(g)), 3),
            "precision": idistill.precision(s.recipe.gradients.dtype, "gradients").summary(),
            "dagster/uri": str(path),
            **remote,
        },
    )


@dg.asset(
    key=[PREFIX, "propagation"],
    deps=[embeddings, landmarks],
    group_name=SHARED,
    kinds={"lancedb", "numpy"},
    code_version="propagation-v1",
    pool="lancedb_writer",
)
def propagation(context: dg.AssetExecutionContext, idistill: IdistillResource) -> dg.MaterializeResult:
    """Target-independent KRR coefficients C = K(X, X_L)(K_LL + λI)⁻¹ of every pool sample (an N × L Lance table,
    committed chunk by chunk and resumed after a kill); a target's propagation is then one product C · V.
    With ``propagate`` fields set to ``auto`` the kernel, bandwidth and ridge are chosen by cross-validation over
    the landmarks' own gradients (still target-independent); the metadata reports the choice and the CV grid."""
    from idistill_core.pipeline.propagation import landmark_gradients_for_propagation, shared_coefficients

    s = idistill.settings
    pool_ids, store = embedded_pool(idistill)
    landmark_ids, lm_grads, _, _ = load_landmarks(idistill)

    on_chunk = eta_logger(context.log, "propagation coefficients: committed chunk", "")

    table, report = shared_coefficients(
        store, pool_ids, landmark_ids, s.recipe.propagate, on_chunk=on_chunk,
        landmark_grads=landmark_gradients_for_propagation(lm_grads, s.recipe),
    )
    selection = report.selection
    artifacts.write_json(
        propagation_path(idistill),
        {"uri": str(store.uri), "table": report.table, "version": report.version, "embeddings_version": store.version},
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"{report.table}@{report.version}"),
        metadata={
            "dagster/row_count": report.rows,
            "dagster/uri": f"{store.uri}::{report.table}",
            "lance_version": report.version,
            "embeddings_lance_version": store.version,
            "landmarks": table.num_landmarks,
            "chunks_computed": report.chunks_computed,
            "chunks_reused": report.chunks_reused,
            "sigma": float(report.sigma) if report.sigma is not None else float("nan"),
            "ridge_abs": report.ridge_abs,
            "kernel": report.config.kernel,
            "ridge": float(report.config.ridge),
            "bandwidth_scale": float(report.config.bandwidth_scale),
            "kernel_selection": "cv" if selection is not None else "fixed",
            **(
                {"cv_error": selection.best.error, "cv_grid": dg.MetadataValue.md(selection.markdown())}
                if selection is not None else {}
            ),
            "seconds": round(report.seconds, 2),
        },
    )


# -- RDS+ pool features (baseline `rds`) -------------------------------------------------------------------


@dg.asset(
    key=[PREFIX, "rds_features"],
    deps=[pool, base_model],
    group_name=SHARED,
    kinds={"lancedb", "pytorch"},
    code_version="rds-features-v1",
    pool="lancedb_writer",
    output_required=False,
)
def rds_features(context: dg.AssetExecutionContext, idistill: IdistillResource):
    """RDS+ representations of every pool sample (final hidden states, position-weighted mean, unit norm) in
    LanceDB, computed once per pool, model and max length and read by every target with method `rds`; only ids
    not yet in the table are computed. While no target uses `rds` there is no pool forward: it materializes an
    empty marker with the reason (so materializing a target never asks to confirm an unmaterialized upstream);
    a target that starts using rds later computes what is missing itself, or re-run this asset up front."""
    users = rds_target_names(idistill)
    if not users:
        reason = f"no target in {idistill.settings.targets_dir} uses method rds"
        context.log.info("nothing to compute: %s", reason)
        yield dg.MaterializeResult(
            data_version=dg.DataVersion(stable_hash({"rds_features": "unused"}, 16)),
            metadata={"dagster/row_count": 0, "skipped": reason, "used_by": "none"},
        )
        return
    loaded = idistill.load_model()
    tokenized = tokenized_pool(idistill, loaded.tokenizer)

    on_commit = eta_logger(context.log, "RDS+ features: committed", "new samples")

    store, report = fill_rds_features(idistill, tokenized.examples, on_commit)
    pool_ids = list(tokenized.examples["sample_id"])
    version = stable_hash({"model": loaded.fingerprint, "recipe": store.identity.recipe, "ids": ids_hash(pool_ids)}, 16)
    yield dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "dagster/row_count": report.row_count,
            "dagster/uri": f"{store.uri}::{store.name}?version={report.table_version}",
            "lance_version": report.table_version,
            "pool_samples": len(pool_ids),
            "inserted": report.inserted,
            "already_present": report.already_present,
            "dimension": store.identity.dim,
            "seconds": round(report.seconds, 2),
            "seconds_per_sample": round(report.seconds / report.computed, 4) if report.computed else 0.0,
            "padding_fraction": round(report.padding_fraction, 4),
            "used_by": ", ".join(users),
        },
    )
