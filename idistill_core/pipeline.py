"""The selection pipeline: the paper's steps composed over small persisted artefacts.

Each function here is one stage that the Dagster assets and the ``idistill select`` CLI both call, so the
two paths run the same code:

1. :func:`embed_pool` — JVP embeddings of every pool sample into the LanceDB :class:`EmbeddingStore`
   (only missing ids are computed).
2. :func:`choose_landmarks` and :func:`compute_gradients` — exact (projected, optionally Adam-preconditioned)
   gradients of the landmarks, of a few held-out pool samples (to measure fidelity), and of the target samples.
3. :func:`estimate_influence` — landmark influence P_L = G_L G_Tᵀ (first order), plus the second-order terms
   when asked.
4. :func:`propagate_scores` — kernel ridge regression from landmark embeddings to every pool sample.
5. :func:`select_samples` — scores → weights → a budgeted subset.

:func:`run_selection` chains them for one pool and one target set in a single call (CLI, tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from idistill_core import backends
from idistill_core.backends import BackendConfig, ModelSource
from idistill_core.batch import TokenBatch, iter_batches, length_order, padding_fraction
from idistill_core.embed import EmbedConfig
from idistill_core.errors import ConfigError, DataError, IdistillError
from idistill_core.gradients import GradientConfig, GradientSet, collect_gradients, select_parameters
from idistill_core.hashing import config_fingerprint
from idistill_core.influence import PoolQPConfig
from idistill_core.landmarks import LandmarkConfig
from idistill_core.less import LessConfig
from idistill_core.precision import PrecisionResolver
from idistill_core.propagate import CoefficientTable, KernelRidge, PropagateConfig, build_coefficients
from idistill_core.store import EmbeddingStore, StoreIdentity
from idistill_core.warmup import WarmupConfig

logger = logging.getLogger("idistill")

METHODS = ("id", "exact", "rds", "random", "midppl", "less")


@dataclass(frozen=True)
class SelectionRecipe:
    """Every knob of a selection run except the budget (which belongs to the target)."""

    method: Literal["id", "exact", "rds", "random", "midppl", "less"] = "id"
    """`id` = Influence Distillation (landmarks + propagation); `exact` = every pool sample is a landmark (no
    propagation; the reference ID approximates); the rest are baselines (`less` = LESS itself, see `less`)."""
    num_landmarks: int = 64
    """L: pool samples whose exact gradients are computed (paper default 4096 for 200k pools)."""
    num_holdout: int = 16
    """Extra pool samples with exact gradients, never used as landmarks: fidelity (Spearman ρ) is measured on them."""
    order: Literal["first", "second"] = "first"
    """`first`: rank by p (paper §1.5, the released code); `second`: the QP with the Hessian term (paper §1.4)."""
    optimizer: Literal["gd", "adam"] = "gd"
    """`adam` preconditions landmark gradients with a warmed-up AdamW state (paper §1.6); needs a warm-up."""
    aggregate: Literal["mean", "rr"] = "mean"
    """`mean`: the paper's mean target gradient (top-k of the mean score); `rr`: the released code's round-robin
    over target samples."""
    max_length: int = 256
    """Tokens per sample; longer samples are truncated and counted (or refused, see `on_overflow`)."""
    on_overflow: Literal["truncate", "error"] = "truncate"
    """`truncate` keeps the first `max_length` tokens of a longer sample and counts it; `error` refuses the run,
    naming the sample."""
    lr: float = 1e-4
    """η of the step the second-order model predicts (only used with order='second')."""
    hessian_targets: int | None = 2
    """Target samples whose Hessian the second order uses (a seeded uniform sample of the dev set; None: all).
    Each keeps its double-backward graph alive for every landmark (~0.6 GiB per 100-token sample on SmolLM2-135M),
    so this bounds the second order's memory; the gradient term always uses every target sample."""
    batch_size: int = 8
    """Samples per forward batch for embeddings and forward-only baselines."""
    seed: int = 0
    """Landmark choice, round-robin order and random baseline."""
    per_source_cap: int | None = None
    """At most this many selected samples from any one pool source (top-k and round-robin both honour it)."""
    landmarks: LandmarkConfig = field(default_factory=LandmarkConfig)
    """Which pool samples become landmarks (`landmarks.strategy`; `random` is the paper's)."""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    gradients: GradientConfig = field(default_factory=GradientConfig)
    propagate: PropagateConfig = field(default_factory=PropagateConfig)
    center: bool = False
    """Centre landmark, held-out and target gradients on the landmarks' mean unit gradient (the pool's mean for
    `exact`) and re-normalise before the first-order inner products: removes the component every gradient shares
    (which makes short-answer samples score high on every target). Changes the paper's objective (docs/DESIGN.md);
    off by default."""
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    less: LessConfig = field(default_factory=LessConfig)
    """LESS's own warm-up, feature and projection settings (only used with method='less')."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"SelectionRecipe.method must be one of {', '.join(METHODS)}; got {self.method!r}.")
        if self.order not in ("first", "second"):
            raise ConfigError(f"SelectionRecipe.order must be 'first' or 'second'; got {self.order!r}.")
        if self.optimizer not in ("gd", "adam"):
            raise ConfigError(f"SelectionRecipe.optimizer must be 'gd' or 'adam'; got {self.optimizer!r}.")
        if self.aggregate not in ("mean", "rr"):
            raise ConfigError(f"SelectionRecipe.aggregate must be 'mean' or 'rr'; got {self.aggregate!r}.")
        if self.num_landmarks <= 0:
            raise ConfigError(f"SelectionRecipe.num_landmarks must be > 0; got {self.num_landmarks}.")
        if self.num_holdout < 0:
            raise ConfigError(f"SelectionRecipe.num_holdout must be >= 0; got {self.num_holdout}.")
        if self.order == "second" and self.aggregate == "rr":
            raise ConfigError("SelectionRecipe.order='second' needs aggregate='mean' (the QP uses the mean target loss).")
        if self.on_overflow not in ("truncate", "error"):
            raise ConfigError(f"SelectionRecipe.on_overflow must be 'truncate' or 'error'; got {self.on_overflow!r}.")
        if self.max_length <= 0 or self.batch_size <= 0:
            raise ConfigError("SelectionRecipe.max_length and batch_size must be > 0.")
        if self.center and self.order == "second":
            raise ConfigError("SelectionRecipe.center applies to first-order scores only; use order='first'.")
        if self.per_source_cap is not None and self.per_source_cap < 1:
            raise ConfigError(f"SelectionRecipe.per_source_cap must be >= 1; got {self.per_source_cap}.")
        if self.hessian_targets is not None and self.hessian_targets < 1:
            raise ConfigError(f"SelectionRecipe.hessian_targets must be >= 1 or null; got {self.hessian_targets}.")

    def embed_fingerprint(self, model_fingerprint: str) -> str:
        return config_fingerprint(self.embed) + "-" + model_fingerprint[:8] + f"-len{self.max_length}"


def resolve_recipe(recipe: SelectionRecipe, model, resolver: PrecisionResolver | None = None
                   ) -> tuple[SelectionRecipe, dict[str, str]]:
    """``recipe`` with every ``auto`` precision made concrete for ``model``'s device, and one line per decision.

    Done before anything is fingerprinted (embedding store, gradient shards), so results computed in different
    dtypes never share a key.
    """
    import dataclasses

    resolver = resolver or PrecisionResolver()
    embed, embed_decision = recipe.embed.resolved(model, resolver)
    grad_decision = resolver.resolve_for_model(recipe.gradients.dtype, model)
    gradients = dataclasses.replace(recipe.gradients, dtype=grad_decision.dtype)
    lines = {"embeddings": embed_decision.summary(), "gradients": grad_decision.summary()}
    return dataclasses.replace(recipe, embed=embed, gradients=gradients), lines


# ---------------------------------------------------------------------------------------------------------
# tokenized examples helpers
# ---------------------------------------------------------------------------------------------------------
def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def _rows_for(examples, ids: Sequence[str] | None) -> list[int]:
    if ids is None:
        return list(range(len(examples)))
    position = {sample_id: i for i, sample_id in enumerate(examples["sample_id"])}
    missing = [s for s in ids if s not in position]
    if missing:
        raise ConfigError(f"sample ids {missing[:5]} are not in the tokenized pool.")
    return [position[s] for s in ids]


def batches_for(
    examples, tokenizer, batch_size: int, ids: Sequence[str] | None = None, bucket: bool = True
) -> Iterable[TokenBatch]:
    """Batches of the tokenized ``examples`` (optionally only ``ids``).

    With ``bucket`` (default) the rows are batched in ``batch.length_order`` (shortest first) to cut padding,
    so batches do NOT come in ``ids`` order: key results by ``sample_id`` (see :func:`in_order`). Without it
    they come in ``ids`` (or row) order.
    """
    rows = _rows_for(examples, ids)
    if bucket and batch_size > 1:
        lengths = [len(x) for x in examples.select(rows)["input_ids"]]
        rows = [rows[i] for i in length_order(lengths)]
    return iter_batches(examples.select(rows), batch_size, _pad_id(tokenizer))


def batch_padding(examples, batch_size: int, ids: Sequence[str] | None = None, bucket: bool = True) -> float:
    """Padding fraction of :func:`batches_for` with the same arguments (the share of wasted positions)."""
    lengths = [len(x) for x in examples.select(_rows_for(examples, ids))["input_ids"]]
    if bucket and batch_size > 1:
        lengths = [lengths[i] for i in length_order(lengths)]
    return padding_fraction(lengths, batch_size)


def in_order(wanted: Sequence[str], got: Sequence[str], values):
    """``values`` (rows keyed by ``got``) re-ordered to ``wanted``; numpy arrays and tensors alike."""
    position = {s: i for i, s in enumerate(got)}
    index = [position[s] for s in wanted]
    return values[torch.as_tensor(index)] if torch.is_tensor(values) else np.asarray(values)[index]


# ---------------------------------------------------------------------------------------------------------
# 1. embeddings
# ---------------------------------------------------------------------------------------------------------
@dataclass
class EmbedReport:
    inserted: int
    already_present: int
    seconds: float
    table_version: int
    row_count: int
    computed: int = 0
    """Samples embedded by this call (on whichever backend); a re-run after a kill computes only the missing."""
    padding_fraction: float = 0.0
    """Share of padded positions in the batches this call computed (length-bucketed)."""


def open_store(
    uri: str | Path, table: str, model_fingerprint: str, recipe: SelectionRecipe, hidden_size: int
) -> EmbeddingStore:
    """Open (or create) the embedding table for this model and embedding recipe; refuses any other."""
    dim = recipe.embed.output_dim(hidden_size)
    identity = StoreIdentity(model_fingerprint=model_fingerprint, recipe=recipe.embed_fingerprint(model_fingerprint), dim=dim)
    return EmbeddingStore.open(uri, table, identity)


def embed_pool(
    model,
    tokenizer,
    examples,
    store: EmbeddingStore,
    config: EmbedConfig,
    commit_every: int = 256,
    progress: bool = False,
    on_commit: Callable[[int, int], None] | None = None,
    backend: BackendConfig | None = None,
    source: ModelSource | None = None,
) -> EmbedReport:
    """Embed the pool samples that the store does not hold yet, committing every ``commit_every`` rows.

    A killed or interrupted run keeps the committed chunks (valid rows: a re-run computes only the ids still
    missing). A run that fails with an error (a NaN in a later sample, say) rolls the table back to its version
    at the start, so no row of a failed run stays; when another writer committed in between, the rows are kept
    instead. Either way the error message says which. ``backend`` says where the vectors are computed (default:
    here, on ``model``; ``ray`` workers load ``source``); this process stays the one writer.
    """
    start = time.perf_counter()
    all_ids = list(examples["sample_id"])
    missing = store.missing_ids(all_ids)
    logger.info("embeddings: %d of %d pool samples missing from '%s'", len(missing), len(all_ids), store.name)
    padding, stream = 0.0, iter(())
    if missing:
        # length-bucketed: every backend batches ids in the order given (batch.py: why one global stable sort)
        lengths = [len(x) for x in examples.select(_rows_for(examples, missing))["input_ids"]]
        missing = [missing[i] for i in length_order(lengths)]
        padding = padding_fraction(sorted(lengths), config.batch_size)
        logger.info("embeddings: length-bucketed batches, padding fraction %.3f", padding)
        stream = backends.embed_stream(backend, model, source, examples, missing, _pad_id(tokenizer), config, progress)
    return _fill_store(store, stream, len(all_ids), len(missing), padding, start, commit_every, on_commit, "embeddings")


def _fill_store(
    store: EmbeddingStore,
    stream: Iterable[tuple[list[str], np.ndarray]],
    pool_size: int,
    total: int,
    padding: float,
    start: float,
    commit_every: int,
    on_commit: Callable[[int, int], None] | None,
    what: str,
) -> EmbedReport:
    """Insert the ``(ids, vectors)`` of ``stream`` (the ``total`` missing ids) into ``store``, a commit per
    ``commit_every`` rows, and report on the whole call (``start``: its ``perf_counter``).

    An interrupt (BaseException) keeps the committed rows to resume from; an error rolls the table back to its
    version at the start, unless another writer committed in between (then this run's rows are kept); the
    re-raised error says which.
    """
    inserted = computed = 0
    pending_ids: list[str] = []
    pending_vectors: list[np.ndarray] = []
    start_version = latest = store.version
    ours = True  # every commit since start_version is this run's

    def commit() -> None:
        nonlocal inserted, pending_ids, pending_vectors, latest, ours
        if pending_ids:
            before = store.version
            inserted += store.insert_missing(pending_ids, np.concatenate(pending_vectors))
            ours = ours and before == latest  # (one insert may be several commits of its own)
            latest = store.version
            if on_commit is not None:
                on_commit(inserted, total)
            pending_ids, pending_vectors = [], []

    try:
        for ids, vectors in stream:
            computed += len(ids)
            pending_ids += ids
            pending_vectors.append(vectors)
            if len(pending_ids) >= commit_every:
                commit()
        commit()
    except Exception as error:
        if inserted == 0:
            raise
        restored = store.restore(start_version, expected_latest=latest) if ours else None
        if restored is not None:
            outcome = (
                f"the table '{store.name}' was rolled back to version {start_version} "
                f"({inserted} rows of this run removed)"
            )
        else:
            outcome = (
                f"this run's {inserted} rows in '{store.name}' are kept (another writer committed since); "
                "a re-run resumes from them"
            )
        logger.error("%s failed: %s", what, outcome)
        if isinstance(error, IdistillError):
            raise type(error)(f"{error}; {outcome}") from None
        raise
    return EmbedReport(
        inserted=inserted,
        already_present=pool_size - total,
        seconds=time.perf_counter() - start,
        table_version=store.version,
        row_count=store.count(),
        computed=computed,
        padding_fraction=padding,
    )


RDS_FEATURES_RECIPE = "rds-plus-v1"
"""Revision of the RDS+ pooling (``baselines.rds_embeddings``); part of the feature table's identity."""


def rds_table_name(model_fingerprint: str, max_length: int) -> str:
    """One RDS+ feature table per model and max length (a profile change opens a new table, never a refusal)."""
    return f"rds_features_{model_fingerprint[:12]}_len{max_length}"


def open_rds_store(uri: str | Path, model_fingerprint: str, max_length: int, hidden_size: int) -> EmbeddingStore:
    """The RDS+ pool-feature table of this model and max length: unit-norm final hidden states, float32
    (cosines are ranked directly; float16 would move them by ~5e-4 and flip near-ties)."""
    identity = StoreIdentity(
        model_fingerprint=model_fingerprint, recipe=f"{RDS_FEATURES_RECIPE}-len{max_length}", dim=hidden_size,
        dtype="float32",
    )
    return EmbeddingStore.open(uri, rds_table_name(model_fingerprint, max_length), identity)


def embed_rds_pool(
    model,
    tokenizer,
    examples,
    store: EmbeddingStore,
    batch_size: int,
    commit_every: int = 256,
    on_commit: Callable[[int, int], None] | None = None,
) -> EmbedReport:
    """RDS+ features (``baselines.rds_embeddings``) of the pool samples ``store`` does not hold yet.

    Target-independent, so computed once per pool and model and read by every target with method ``rds``.
    Length-bucketed batches of ``batch_size`` (one decoder forward each, torch's own threads), committed every
    ``commit_every`` rows (insert-if-missing keyed by ``sample_id``): a killed run keeps its committed
    rows, each a finished feature of one sample, and a re-run computes only the ids still missing; a failed one
    rolls the table back as ``embed_pool`` does.
    """
    from idistill_core import baselines

    start = time.perf_counter()
    all_ids = list(examples["sample_id"])
    missing = store.missing_ids(all_ids)
    logger.info("RDS+ features: %d of %d pool samples missing from '%s'", len(missing), len(all_ids), store.name)
    padding = batch_padding(examples, batch_size, missing) if missing else 0.0

    def stream():
        for batch in batches_for(examples, tokenizer, batch_size, ids=missing):
            ids, features = baselines.rds_embeddings(model, [batch])
            yield ids, features.numpy()

    return _fill_store(
        store, stream(), len(all_ids), len(missing), padding, start, commit_every, on_commit, "RDS+ features"
    )


# ---------------------------------------------------------------------------------------------------------
# 2. landmarks and gradients
# ---------------------------------------------------------------------------------------------------------
def choose_landmarks(
    sample_ids: Sequence[str],
    num_landmarks: int,
    num_holdout: int,
    seed: int,
    config: LandmarkConfig | None = None,
    embeddings: np.ndarray | None = None,
) -> tuple[list[str], list[str]]:
    """Landmarks and disjoint held-out samples, deterministic for a seed (see :mod:`idistill_core.landmarks`).

    The default (uniform random, without replacement over sorted ids) is the paper's; with
    ``strategy='adaptive'`` this is its first, random round (:func:`adaptive_landmarks` adds the rest).
    """
    from idistill_core import landmarks

    return landmarks.choose(sample_ids, num_landmarks, num_holdout, seed, config, embeddings)


def adaptive_round(
    store: EmbeddingStore,
    pool_ids: Sequence[str],
    landmark_ids: Sequence[str],
    lm_values: np.ndarray,
    holdout_ids: Sequence[str],
    budget: int,
    recipe: SelectionRecipe,
    exact_values: Callable[[list[str]], np.ndarray],
    landmark_grads: torch.Tensor | np.ndarray | None = None,
) -> tuple[list[str], np.ndarray]:
    """The adaptive strategy's second round: propagate the first-round landmarks, take the rest of the budget
    nearest the top-k cut of that estimate (``exact_values(ids)`` gives their ``(n, T)`` exact values), and
    return all landmarks with their values (the caller refits). ``landmark_grads`` (first-round landmarks) are
    needed when the propagate config has ``auto`` fields."""
    from idistill_core import landmarks

    ids, scores, _ = propagate_scores(
        store, pool_ids, landmark_ids, lm_values, recipe.propagate, landmark_grads=landmark_grads
    )
    more = landmarks.boundary_picks(
        ids, scores, budget, recipe.num_landmarks - len(landmark_ids), [*landmark_ids, *holdout_ids]
    )
    if not more:
        return list(landmark_ids), lm_values
    return [*landmark_ids, *more], np.concatenate([lm_values, exact_values(more)])


def compute_gradients(
    model, tokenizer, examples, ids: Sequence[str] | None, config: GradientConfig, preconditioner=None, progress: bool = False,
    backend: BackendConfig | None = None, source: ModelSource | None = None,
) -> GradientSet:
    """Projected, unit-normalised per-sample gradients for ``ids`` of ``examples`` (all rows when None).

    ``backend`` other than local computes them there (workers load ``source``), returned in the order of ``ids``.
    """
    if backend is not None and backend.name != "local":
        ids = list(examples["sample_id"]) if ids is None else list(ids)
        rows: dict[str, np.ndarray] = {}
        stream = backends.gradient_stream(backend, model, source, examples, ids, _pad_id(tokenizer), config, preconditioner)
        for batch_ids, grads in stream:
            rows.update(zip(batch_ids, grads))
        return GradientSet(ids, torch.from_numpy(np.stack([rows[s] for s in ids])) if ids else torch.zeros((0, 0)))
    batches = batches_for(examples, tokenizer, config.batch_size, ids=ids)
    got = collect_gradients(model, batches, config, preconditioner=preconditioner, progress=progress)
    wanted = list(examples["sample_id"]) if ids is None else list(ids)
    if got.sample_ids == wanted or not got.sample_ids:
        return got
    return GradientSet(wanted, in_order(wanted, got.sample_ids, got.grads))  # batches were length-bucketed


def compute_gradients_resumable(
    model,
    tokenizer,
    examples,
    ids: Sequence[str],
    config: GradientConfig,
    shard_dir: str | Path,
    preconditioner=None,
    chunk_size: int = 256,
    on_chunk: Callable[[int, int], None] | None = None,
    backend: BackendConfig | None = None,
    source: ModelSource | None = None,
) -> GradientSet:
    """:func:`compute_gradients` for ``ids``, committed chunk by chunk to safetensors shards in ``shard_dir``.

    ``shard_dir`` must be keyed by everything the gradients depend on (ids, model, gradient config,
    preconditioner); a shard whose ids differ from its chunk is recomputed. A killed or interrupted run keeps
    every committed shard, so a re-run computes only the missing chunks; a run that fails with an error removes
    the shards it wrote itself (keeping those of earlier runs), so a failure leaves the folder as it found it.
    Chunks are a multiple of ``config.batch_size`` so the batches (and so the float results) are the same whether
    or not a run was interrupted. Every missing chunk goes to ``backend`` as one stream (in parallel on Ray,
    whose results come back in any order); this process writes each chunk's shard as soon as all of its rows are
    back.

    Returns:
        ``GradientSet`` with ``grads: (len(ids), P) float32`` in the order of ``ids``.
    """
    from idistill_core import artifacts

    ids = list(ids)
    shard_dir = Path(shard_dir)
    step = max(config.batch_size, chunk_size - chunk_size % config.batch_size)
    chunks = [ids[start : start + step] for start in range(0, len(ids), step)]
    done: dict[int, np.ndarray] = {}
    for number, chunk_ids in enumerate(chunks):
        shard = shard_dir / f"chunk-{number:05d}.safetensors"
        if shard.exists():
            arrays, meta = artifacts.load_arrays(shard)
            if meta.get("ids") == chunk_ids:
                done[number] = arrays["grads"]
    todo = [number for number in range(len(chunks)) if number not in done]
    chunk_of = {sample_id: number for number in todo for sample_id in chunks[number]}
    rows: dict[str, np.ndarray] = {}
    missing = [sample_id for number in todo for sample_id in chunks[number]]
    written: list[Path] = []
    try:
        stream = backends.gradient_stream(backend, model, source, examples, missing, _pad_id(tokenizer), config, preconditioner)
        for batch_ids, grads in stream:
            rows.update(zip(batch_ids, grads))
            for number in sorted({chunk_of[s] for s in batch_ids}):
                if number not in done and all(s in rows for s in chunks[number]):
                    done[number] = np.stack([rows.pop(s) for s in chunks[number]])
                    shard = shard_dir / f"chunk-{number:05d}.safetensors"
                    artifacts.save_arrays(shard, {"grads": done[number]}, {"ids": chunks[number]})
                    written.append(shard)
                    if on_chunk is not None:
                        on_chunk(number + 1, len(chunks))
    except Exception as error:  # an interrupt (BaseException) keeps the shards to resume from
        if not written:
            raise
        for shard in written:
            shard.unlink(missing_ok=True)
        if shard_dir.exists() and not any(shard_dir.iterdir()):
            shard_dir.rmdir()
        outcome = f"the {len(written)} gradient shards of this run were removed from {shard_dir}"
        if isinstance(error, IdistillError):
            raise type(error)(f"{error}; {outcome}") from None
        raise
    grads = torch.from_numpy(np.concatenate([done[n] for n in range(len(chunks))])) if chunks else torch.zeros((0, 0))
    return GradientSet(sample_ids=ids, grads=grads)


# ---------------------------------------------------------------------------------------------------------
# 3.–4. influence and propagation
# ---------------------------------------------------------------------------------------------------------
def landmark_values(landmark_grads: torch.Tensor, target_grads: torch.Tensor, aggregate: str) -> np.ndarray:
    """P_L = G_L G_Tᵀ, ``(L, T)``; with aggregate='mean' the mean column ``(L, 1)`` (= G_L ḡ_T)."""
    from idistill_core.influence import first_order

    values = first_order(landmark_grads, target_grads)
    values = values.detach().cpu().double().numpy() if torch.is_tensor(values) else np.asarray(values, dtype=np.float64)
    if aggregate == "mean":
        values = values.mean(axis=1, keepdims=True)
    return values


def landmark_gradients_for_propagation(landmark_grads, recipe: SelectionRecipe):
    """The landmark gradients kernel selection should predict: the ones the landmark values are computed from
    (centred when ``recipe.center``); None when the propagate config has no ``auto`` field (nothing to choose)."""
    if not recipe.propagate.needs_selection:
        return None
    g = torch.as_tensor(np.asarray(landmark_grads))
    if recipe.center:
        from idistill_core.influence import center_gradients

        g = center_gradients(g, g.mean(dim=0))
    return g


def propagate_scores(
    store: EmbeddingStore,
    pool_ids: Sequence[str],
    landmark_ids: Sequence[str],
    values: np.ndarray,
    config: PropagateConfig,
    chunk_size: int = 4096,
    landmark_grads: torch.Tensor | np.ndarray | None = None,
) -> tuple[list[str], np.ndarray, KernelRidge]:
    """KRR from landmark embeddings to every sample of the pool: ``(pool ids, (N, T) float32, fitted model)``.

    Only ``pool_ids`` are read from the store (by id, in that order): a store shared with other pools never
    leaks their rows into the scores. ``auto`` fields of ``config`` are chosen from ``landmark_grads`` first
    (``kernel_select``), never from ``values``.
    """
    landmark_emb = store.read(list(landmark_ids))
    if config.needs_selection:
        from idistill_core.kernel_select import select_kernel

        if landmark_grads is None:
            raise ConfigError("PropagateConfig has 'auto' fields: propagate_scores needs the landmark gradients")
        config = select_kernel(landmark_emb, landmark_grads, config).config
    ridge = KernelRidge.fit(landmark_emb, config)
    ids: list[str] = []

    def chunks():
        for chunk_ids, chunk in store.iter_chunks(chunk_size, sample_ids=pool_ids):
            ids.extend(chunk_ids)
            yield chunk

    scores = np.asarray(ridge.predict(values, chunks()), dtype=np.float32)
    return ids, scores, ridge


def shared_coefficients(
    store: EmbeddingStore,
    pool_ids: Sequence[str],
    landmark_ids: Sequence[str],
    config: PropagateConfig,
    dtype: str = "float32",
    on_chunk: Callable[[int, int], None] | None = None,
    landmark_grads: torch.Tensor | np.ndarray | None = None,
):
    """The target-independent KRR coefficients ``C (N, L)`` of the pool, built once and resumably in the store's
    LanceDB folder (``(CoefficientTable, CoefficientReport)``); every target then needs only ``C · V``.

    ``landmark_grads`` ``(L, P)`` (rows in ``landmark_ids`` order) are needed when ``config`` has ``auto`` fields:
    the kernel, bandwidth and ridge are then chosen by cross-validation on the landmarks' own gradients, which
    keeps the coefficients target-independent (``CoefficientReport.selection`` has the choice and its CV grid).
    """
    return build_coefficients(
        store, pool_ids, landmark_ids, config, dtype=dtype, on_chunk=on_chunk, landmark_grads=landmark_grads
    )


def keep_exact(ids: Sequence[str], scores: np.ndarray, exact_ids: Sequence[str], exact_values: Sequence[np.ndarray]) -> np.ndarray:
    """``scores`` with the rows of samples whose exact gradient was computed (landmarks, held-out samples)
    replaced by their exact values: only the others need the propagated estimate."""
    values = [np.asarray(v, dtype=np.float64).reshape(-1, scores.shape[1]) for v in exact_values if len(v)]
    if not values:
        return scores
    exact = np.concatenate(values)
    position = {s: i for i, s in enumerate(ids)}
    rows = [(position[s], j) for j, s in enumerate(exact_ids) if s in position]
    out = np.array(scores, copy=True)
    if rows:
        at, src = zip(*rows, strict=True)
        out[list(at)] = exact[list(src)].astype(out.dtype)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def fidelity(
    ridge: KernelRidge, landmark_vals: np.ndarray, holdout_emb: np.ndarray, holdout_vals: np.ndarray
) -> float:
    """Spearman ρ between propagated and exact influence (mean over targets) on held-out pool samples.

    ``landmark_vals``: (L, T) exact landmark influence the ridge was fitted for; ``holdout_emb``: (H, D);
    ``holdout_vals``: (H, T) exact influence of the held-out samples.
    """
    if len(holdout_emb) < 3:
        return float("nan")
    predicted = np.asarray(ridge.predict(landmark_vals, [holdout_emb]))
    return spearman(predicted.mean(axis=1), np.asarray(holdout_vals).mean(axis=1))


def coefficient_fidelity(
    coefficients: CoefficientTable, landmark_vals: np.ndarray, holdout_ids: Sequence[str], holdout_vals: np.ndarray
) -> float:
    """:func:`fidelity` from the shared coefficients: Spearman ρ of ``C_holdout · V`` against the exact values."""
    if len(holdout_ids) < 3:
        return float("nan")
    predicted = coefficients.read(list(holdout_ids)).astype(np.float64) @ np.asarray(landmark_vals, dtype=np.float64)
    return spearman(predicted.mean(axis=1), np.asarray(holdout_vals).mean(axis=1))


# ---------------------------------------------------------------------------------------------------------
# 5. selection
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SelectionOutcome:
    """One row per pool sample (aligned lists/arrays) plus the selection in pick order."""

    sample_ids: list[str]
    scores: np.ndarray
    """(N,) aggregated score (mean over target columns, or the baseline's score)."""
    weights: np.ndarray
    """(N,) non-negative weights summing to N over the selected samples, zero elsewhere."""
    selected: list[str]
    """Selected ids in pick order (rank 0 first)."""
    method: str
    details: dict = field(default_factory=dict)

    def rank(self) -> np.ndarray:
        """(N,) pick rank of each sample, -1 when not selected."""
        position = {sample_id: r for r, sample_id in enumerate(self.selected)}
        return np.array([position.get(s, -1) for s in self.sample_ids], dtype=np.int64)

    def to_arrow(self, sources: Sequence[str] | None = None):
        import pyarrow as pa

        chosen = set(self.selected)
        columns = {
            "sample_id": pa.array(self.sample_ids, pa.string()),
            "score": pa.array(self.scores.astype(np.float64)),
            "weight": pa.array(self.weights.astype(np.float64)),
            "selected": pa.array([s in chosen for s in self.sample_ids]),
            "rank": pa.array(self.rank()),
        }
        if sources is not None:
            columns["source"] = pa.array(list(sources), pa.string())
        return pa.table(columns)


def uniform_weights(sample_ids: Sequence[str], picked: Sequence[str]) -> np.ndarray:
    """(N,) weights spreading the total N evenly over ``picked`` (zero elsewhere)."""
    index = {s: i for i, s in enumerate(sample_ids)}
    weights = np.zeros(len(sample_ids))
    weights[[index[s] for s in picked]] = len(sample_ids) / len(picked)
    return weights


def cap_options(ids: Sequence[str], recipe: SelectionRecipe, source_of: Mapping[str, str] | None) -> dict:
    """``select_samples`` keywords for the recipe's per-source cap (none without a cap).

    Raises:
        ConfigError: a cap is set but the sources of the pool are not known here.
    """
    if recipe.per_source_cap is None:
        return {}
    if source_of is None:
        raise ConfigError("per_source_cap is set but this selection was given no pool sources.")
    return {"sources": [source_of.get(s, "") for s in ids], "per_source_cap": recipe.per_source_cap}


def _check_budget(budget: int, n: int) -> None:
    if budget <= 0 or budget > n:
        raise ConfigError(f"budget k={budget} must satisfy 0 < k <= N={n} (the number of usable pool samples).")


def select_samples(
    sample_ids: Sequence[str],
    scores: np.ndarray,
    budget: int,
    aggregate: str = "mean",
    seed: int = 0,
    method: str = "id",
    sources: Sequence[str] | None = None,
    per_source_cap: int | None = None,
    fixed_order: bool = False,
) -> SelectionOutcome:
    """Scores ``(N,)`` or ``(N, T)`` → a budgeted subset with first-order weights (paper §1.5).

    ``fixed_order``: round-robin visits targets in column order every round (RDS+), not a seeded permutation.

    The weights are the closed-form first-order QP solution (simplex projection of the scores), whose support
    is exactly the top-k; with round-robin the support is the round-robin picks.
    """
    from idistill_core.influence import first_order_weights
    from idistill_core.select import round_robin, select_top_k

    sample_ids = list(sample_ids)
    _check_budget(budget, len(sample_ids))
    scores = np.asarray(scores, dtype=np.float64)
    matrix = scores if scores.ndim == 2 else scores[:, None]
    aggregated = matrix.mean(axis=1)
    if aggregate == "rr" and matrix.shape[1] > 1:
        picked = list(
            round_robin(
                sample_ids, matrix, budget, seed, fixed_order=fixed_order, sources=sources,
                per_source_cap=per_source_cap,
            ).sample_ids
        )
        weights = uniform_weights(sample_ids, picked)
    else:
        selection = select_top_k(sample_ids, aggregated, budget, sources=sources, per_source_cap=per_source_cap)
        picked = list(selection.sample_ids)
        weights = np.zeros(len(sample_ids))
        if per_source_cap is None:
            weights = first_order_weights(torch.from_numpy(aggregated), budget, float(len(sample_ids))).numpy()
        if per_source_cap is not None or np.count_nonzero(weights) != len(picked):
            # caps (or exact ties) change the support: spread the mass uniformly over the picks instead
            weights = uniform_weights(sample_ids, picked)
    return SelectionOutcome(sample_ids, aggregated, weights, picked, method)


def mix_outcome(
    outcomes: Sequence[SelectionOutcome],
    budget: int,
    weights: Sequence[float] | None,
    recipe: SelectionRecipe,
    source_of: Mapping[str, str] | None = None,
) -> SelectionOutcome:
    """One subset for several targets from their per-target outcomes: target ``j`` gets its share of
    ``budget`` (``select.mix_budgets``), picked round-robin by its own aggregated score (caps honoured)."""
    from idistill_core.select import mix_budgets, select_mix

    ids = sorted(outcomes[0].sample_ids)
    columns = []
    for outcome in outcomes:
        score = dict(zip(outcome.sample_ids, outcome.scores, strict=True))
        if set(score) != set(ids):
            raise ConfigError("multi-target mix: the targets' outcomes do not cover the same pool samples.")
        columns.append(np.array([score[s] for s in ids], dtype=np.float64))
    selection = select_mix(ids, columns, budget, weights, **cap_options(ids, recipe, source_of))
    picked = list(selection.sample_ids)
    details = {"budgets": mix_budgets(budget, weights or [1.0] * len(outcomes)), "picked_by": selection.targets.tolist()}
    return SelectionOutcome(ids, np.mean(columns, axis=0), uniform_weights(ids, picked), picked, "mix", details)


# ---------------------------------------------------------------------------------------------------------
# second order (paper §1.3–1.4; not in the released code)
# ---------------------------------------------------------------------------------------------------------
def second_order_terms_for(
    model, tokenizer, pool_examples, target_examples, landmark_ids: Sequence[str], recipe: SelectionRecipe,
    preconditioner=None, on_progress: Callable[[str], None] | None = None,
) -> dict:
    """Landmark ``p`` (L,) and ``Q`` (L, L) of the quadratic model of the mean target loss after one step.

    Sketched (``influence.sketched_second_order_terms``): the landmark directions and target gradient are first
    order's (unit-normalised, ⊙ the Adam factor with a preconditioner, projected by ``recipe.gradients``), and
    only projected gradients and projected Hessian-vector products are kept, so memory is O(L · P), and η → 0
    gives back the first-order landmark values. The Hessian is that of ``recipe.hessian_targets`` target samples
    (seeded by ``recipe.seed``), whose graphs are what the memory holds beyond the model. Progress (a line per
    ~5% of the landmarks, with the rate) goes to ``on_progress`` (default: this module's logger).
    """
    from idistill_core.influence import sketched_second_order_terms

    report = on_progress or logger.info
    total, every, start = len(landmark_ids), max(1, len(landmark_ids) // 20), time.perf_counter()

    def on_landmark(done: int) -> None:
        if done % every == 0 or done == total:
            rate = (time.perf_counter() - start) / done
            report(f"second order: {done}/{total} landmarks ({rate:.1f} s each, ~{rate * (total - done) / 60:.0f} min left)")

    target_ids = list(target_examples["sample_id"])
    hessian = None
    if recipe.hessian_targets is not None and recipe.hessian_targets < len(target_ids):
        rng = np.random.default_rng(recipe.seed)
        picked = sorted(rng.choice(len(target_ids), size=recipe.hessian_targets, replace=False).tolist())
        hessian = batches_for(target_examples, tokenizer, 1, ids=[target_ids[i] for i in picked])
    terms = sketched_second_order_terms(
        model,
        batches_for(pool_examples, tokenizer, 1, ids=landmark_ids),
        batches_for(target_examples, tokenizer, 1),  # one at a time: a batch's activations would set the peak
        recipe.gradients,
        preconditioner=preconditioner,
        lr=recipe.lr,
        hessian_batches=hessian,
        on_landmark=on_landmark,
    )
    return {
        "p": terms.p.detach().double().numpy(),
        "q": terms.q.detach().double().numpy(),
        "lr": np.array([terms.lr]),
        "num_source": np.array([terms.num_source]),
    }


def qp_outcome(
    ids: Sequence[str] | None,
    coefficients: np.ndarray | CoefficientTable,
    second: dict,
    budget: int,
    recipe: SelectionRecipe,
    qp: PoolQPConfig | None = None,
) -> SelectionOutcome:
    """Second-order weights over the whole pool: lift landmark terms with the KRR coefficients C (N, L)
    (g_i ≈ Σ_j C_ij g_j, so p_pool = C p_L and Q_pool = C Q_L Cᵀ, never formed) and solve the QP with a
    binary search on λ for exactly ``budget`` non-zero weights.

    ``coefficients`` is an in-memory ``(N, L)`` matrix (rows in ``ids`` order) or the coefficient table itself
    (``ids`` None: the table's order); ``qp`` says whether the table is read into float32 memory or streamed per
    product, and the product dtype (``influence.PoolQPConfig``; no N × L float64 copy either way)."""
    from idistill_core.influence import SecondOrderTerms, pool_terms, qp_weights

    if not hasattr(coefficients, "iter_chunks"):  # a matrix (a CoefficientTable streams itself)
        coefficients = torch.from_numpy(np.asarray(coefficients))
    terms = SecondOrderTerms(
        p=torch.from_numpy(np.asarray(second["p"], dtype=np.float64)),
        q=torch.from_numpy(np.asarray(second["q"], dtype=np.float64)),
        lr=float(np.asarray(second["lr"]).reshape(-1)[0]),
        num_source=int(np.asarray(second["num_source"]).reshape(-1)[0]),
    )
    p_pool, quad = pool_terms(coefficients, terms, qp)
    if quad.ids is not None:
        if ids is not None and list(ids) != quad.ids:
            raise ConfigError("qp_outcome: ids differ from the coefficient table's row order.")
        ids = quad.ids
    if ids is None or len(ids) != quad.n:
        got = None if ids is None else len(ids)
        raise ConfigError(f"qp_outcome: need one id per coefficient row ({quad.n}); got {got}.")
    from idistill_core.select import select_from_weights

    weights = qp_weights(p_pool, quad, terms.lr, budget).double().numpy()
    ids = list(ids)
    # the λ search may not reach exactly k non-zeros (ties, convexity floor): keep the k largest, renormalise
    selection = select_from_weights(ids, weights, budget)
    keep = np.zeros(len(ids), dtype=bool)
    index = {s: i for i, s in enumerate(ids)}
    keep[[index[s] for s in selection.sample_ids]] = True
    weights = np.where(keep, weights, 0.0)
    weights *= len(ids) / weights.sum()
    return SelectionOutcome(ids, p_pool.numpy(), weights, list(selection.sample_ids), "id-second-order")


# ---------------------------------------------------------------------------------------------------------
# warm-up (Adam preconditioning)
# ---------------------------------------------------------------------------------------------------------
def warmup_preconditioner(model, tokenizer, examples, recipe: SelectionRecipe, progress: bool = False):
    """Warm ``model`` up in place on a seeded random pool subset; return its Adam preconditioner (paper §1.6)."""
    from idistill_core.warmup import adam_preconditioner, warmup

    cfg = recipe.warmup
    n = len(examples)
    size = min(n, cfg.steps * cfg.batch_size)
    rows = np.random.default_rng(cfg.seed).choice(n, size=size, replace=False)
    subset = examples.select(sorted(int(r) for r in rows))
    batches = list(iter_batches(subset, cfg.batch_size, _pad_id(tokenizer)))
    optimizer = warmup(model, batches, cfg, progress=progress)
    names = select_parameters(model, recipe.gradients.param_subset)
    return adam_preconditioner(model, optimizer, names)


# ---------------------------------------------------------------------------------------------------------
# scoring by method (shared by run_selection and the per-target assets)
# ---------------------------------------------------------------------------------------------------------
def baseline_outcome(
    method: str, model, tokenizer, pool_examples, target_examples, budget: int, recipe: SelectionRecipe,
    source_of: Mapping[str, str] | None = None, pool_features: np.ndarray | None = None,
    target_subtasks: Mapping[str, str] | None = None,
) -> SelectionOutcome:
    """Baselines: forward-only `random`, `midppl` (target-agnostic) and `rds` (RDS+ cosine, round-robin), and `less`
    (LESS: its own LoRA warm-up and gradient features, :func:`less_outcome`).

    ``pool_features``: for `rds`, the pool's precomputed RDS+ features ``(N, H)`` in ``pool_examples`` order
    (:func:`embed_rds_pool`, read from its store); then only the target samples are embedded here.
    """
    from idistill_core import baselines

    pool_ids = list(pool_examples["sample_id"])
    _check_budget(budget, len(pool_ids))
    if method == "random":
        scores = np.asarray(baselines.random_scores(pool_ids, recipe.seed))
        return select_samples(pool_ids, scores, budget, method=method, **cap_options(pool_ids, recipe, source_of))
    if method == "midppl":
        got, nll = baselines.midppl_scores(model, batches_for(pool_examples, tokenizer, recipe.batch_size))
        ids, nll = pool_ids, np.asarray(in_order(pool_ids, list(got), nll), dtype=np.float64)
        picked = list(baselines.midppl_select(ids, nll, budget).sample_ids)
        return SelectionOutcome(ids, nll, uniform_weights(ids, picked), picked, method)
    if method == "rds":
        if pool_features is None:
            got, features = baselines.rds_embeddings(model, batches_for(pool_examples, tokenizer, recipe.batch_size))
            pool_features = in_order(pool_ids, got, features.numpy())  # batches were length-bucketed
        if np.shape(pool_features)[0] != len(pool_ids):
            raise DataError(f"pool_features has {np.shape(pool_features)[0]} rows for a pool of {len(pool_ids)}")
        # targets in file order: their columns set the round-robin order
        target_ids, targets = baselines.rds_embeddings(
            model, batches_for(target_examples, tokenizer, recipe.batch_size, bucket=False)
        )
        if not target_ids:
            raise DataError("the target set has no usable samples for RDS+")
        cosine = baselines.rds_scores_from_features(pool_features, targets)
        # RDS+'s code visits the query examples in a fixed order every round
        return select_samples(
            pool_ids, cosine, budget, aggregate="rr", seed=recipe.seed, method=method, fixed_order=True,
            **cap_options(pool_ids, recipe, source_of),
        )
    if method == "less":
        return less_outcome(model, tokenizer, pool_examples, target_examples, budget, recipe, source_of, target_subtasks)
    raise ConfigError(f"'{method}' is not a baseline (random, midppl, rds, less).")


def less_outcome(
    model, tokenizer, pool_examples, target_examples, budget: int, recipe: SelectionRecipe,
    source_of: Mapping[str, str] | None = None, target_subtasks: Mapping[str, str] | None = None,
    progress: bool = False,
) -> SelectionOutcome:
    """LESS end to end (``idistill_core.less``): LoRA warm-up on a seeded ``recipe.less.warmup_fraction`` of the
    pool, Adam features of every pool sample and SGD features of every target at each epoch's checkpoint,
    learning-rate-weighted cosine, mean within each target sub-task, max over sub-tasks, top-k. ``model`` itself
    is not changed (the adapters go on a copy).

    ``target_subtasks``: target sample id → sub-task (LESS's MMLU subjects, BBH tasks, TyDiQA languages; the CLI
    passes each target row's ``source``); None = the whole target set is one sub-task (a plain mean).
    """
    from idistill_core import baselines, less

    cfg = recipe.less
    pool_ids = list(pool_examples["sample_id"])
    _check_budget(budget, len(pool_ids))
    target_ids = list(target_examples["sample_id"])
    missing = [t for t in target_ids if target_subtasks is not None and t not in target_subtasks]
    if missing:
        raise ConfigError(f"target sample '{missing[0]}' has no sub-task in target_subtasks.")
    groups = ["all"] * len(target_ids) if target_subtasks is None else [str(target_subtasks[t]) for t in target_ids]
    n = len(pool_ids)
    size = max(1, int(n * cfg.warmup_fraction))  # the authors' int(len * percentage)
    rows = np.random.default_rng(cfg.seed).choice(n, size=size, replace=False)
    warm_batches = list(iter_batches(pool_examples.select(sorted(int(r) for r in rows)), 1, _pad_id(tokenizer)))
    warm = less.lora_warmup(model, warm_batches, cfg, progress=progress)
    weights = [c.mean_lr for c in warm.checkpoints]
    target_rows = [g for _, g in less.adam_features(
        warm, batches_for(target_examples, tokenizer, recipe.batch_size, bucket=False), cfg, kind="sgd")]
    targets = torch.cat(target_rows).transpose(0, 1)  # (C, T, d), targets in file order like `groups`
    got, scores = baselines.less_scores(
        less.adam_features(warm, batches_for(pool_examples, tokenizer, recipe.batch_size), cfg, progress=progress),
        targets, groups, weights,
    )
    scores = np.asarray(in_order(pool_ids, list(got), scores), dtype=np.float64)  # batches were length-bucketed
    picked = list(less.less_select(pool_ids, scores, budget, **cap_options(pool_ids, recipe, source_of)).sample_ids)
    details = {"warmup_ids": [pool_ids[int(r)] for r in sorted(rows)], "checkpoint_weights": weights,
               "subtasks": sorted(set(groups))}
    return SelectionOutcome(pool_ids, scores, uniform_weights(pool_ids, picked), picked, "less", details)


def exact_outcome(
    grad_model, tokenizer, pool_examples, target_grads: torch.Tensor, budget: int, recipe: SelectionRecipe,
    preconditioner=None, aggregate: str | None = None, method: str = "exact", progress: bool = False,
    source_of: Mapping[str, str] | None = None,
) -> SelectionOutcome:
    """Every pool sample is a landmark: exact gradients for all N, no propagation (the reference ID approximates)."""
    aggregate = aggregate or recipe.aggregate
    pool = compute_gradients(grad_model, tokenizer, pool_examples, None, recipe.gradients, preconditioner, progress)
    pool_grads = pool.grads
    if recipe.center:
        from idistill_core.influence import center_gradients

        mean = pool_grads.mean(dim=0)  # exact knows every pool gradient: centre on the pool mean
        pool_grads, target_grads = center_gradients(pool_grads, mean), center_gradients(target_grads, mean)
    values = landmark_values(pool_grads, target_grads, aggregate)
    return select_samples(
        pool.sample_ids, values, budget, aggregate, recipe.seed, method=method,
        **cap_options(pool.sample_ids, recipe, source_of),
    )


def landmark_outcome(
    coefficients: CoefficientTable,
    landmark_ids: Sequence[str],
    lm_values: np.ndarray,
    holdout_ids: Sequence[str],
    ho_values: np.ndarray,
    budget: int,
    recipe: SelectionRecipe,
    aggregate: str | None = None,
    second_order: dict | None = None,
    source_of: Mapping[str, str] | None = None,
) -> tuple[SelectionOutcome, float | None, dict[str, float]]:
    """Influence Distillation proper: propagate landmark influence to the pool (``C · V`` with the shared
    coefficients of exactly that pool, no refit), then select.

    Returns the outcome, the fidelity (Spearman ρ on held-out samples, None without them) and stage timings.
    ``second_order`` = {"p": (L,), "q": (L, L)} switches selection to the QP weights (paper §1.4).
    """
    aggregate = aggregate or recipe.aggregate
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if list(landmark_ids) != coefficients.landmark_ids:
        raise ConfigError("the landmark values' landmarks differ from those the propagation coefficients were built for.")
    ids, scores = coefficients.propagate(lm_values)
    scores = keep_exact(ids, scores, [*landmark_ids, *holdout_ids], [lm_values, ho_values])
    timings["propagation"] = time.perf_counter() - start
    rho = None
    if len(holdout_ids) >= 3:
        rho = coefficient_fidelity(coefficients, lm_values, holdout_ids, ho_values)
    start = time.perf_counter()
    if second_order is not None:
        # the table itself: PoolQPConfig decides float32 in memory or streamed, never an N × L float64 copy
        outcome = qp_outcome(None, coefficients, second_order, budget, recipe)
    else:
        outcome = select_samples(
            ids, scores, budget, aggregate, recipe.seed, method="id", **cap_options(ids, recipe, source_of)
        )
    timings["selection"] = time.perf_counter() - start
    return outcome, rho, timings


# ---------------------------------------------------------------------------------------------------------
# one call: pool + targets → selection
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SelectionReport:
    outcome: SelectionOutcome
    timings: dict[str, float]
    sizes: dict[str, int]
    fidelity: float | None = None
    notes: list[str] = field(default_factory=list)
    precision: dict[str, str] = field(default_factory=dict)
    """Resolved compute precision per step, with the reason (``precision.PrecisionDecision.summary``)."""
    propagation: str | None = None
    """The kernel, bandwidth and ridge the propagation used (chosen by CV or fixed), one line."""
    kernel_selection: object | None = None
    """``kernel_select.KernelSelection`` when the propagate config had ``auto`` fields."""


def run_selection(
    model,
    tokenizer,
    model_fingerprint: str,
    pool_examples,
    target_examples,
    budget: int,
    recipe: SelectionRecipe,
    store_uri: str | Path,
    store_table: str = "embeddings",
    progress: bool = False,
    backend: BackendConfig | None = None,
    source: ModelSource | None = None,
    resolver: PrecisionResolver | None = None,
    commit_every: int = 256,
    on_commit: Callable[[int, int], None] | None = None,
    source_of: Mapping[str, str] | None = None,
    target_subtasks: Mapping[str, str] | None = None,
) -> SelectionReport:
    """Run one selection method end to end on tokenized pool and target examples (``datasets.Dataset``).

    ``commit_every`` and ``on_commit`` go to :func:`embed_pool` (the only stage that commits); ``source_of``
    (sample id → pool source) is needed when the recipe sets ``per_source_cap``; ``target_subtasks`` (target id →
    sub-task) is used by `less` only (max over sub-tasks; None = one sub-task).
    """
    recipe, precision = resolve_recipe(recipe, model, resolver)
    timings: dict[str, float] = {}
    pool_ids = list(pool_examples["sample_id"])
    _check_budget(budget, len(pool_ids))
    if len(target_examples) == 0:
        raise ConfigError("the target set has no usable samples (all empty or without assistant tokens).")
    sizes = {"pool": len(pool_ids), "targets": len(target_examples), "budget": budget}
    cap_options(pool_ids, recipe, source_of)  # a cap without sources is refused before any work
    method = recipe.method
    if backend is not None and backend.name != "local" and recipe.optimizer == "adam" and method in ("id",):
        # workers load `source` (the base weights); the warmed copy lives only in this process
        raise ConfigError(f"optimizer='adam' is not supported with backend '{backend.name}' in run_selection; "
                          "use the Dagster assets (the warmed checkpoint is loaded by the workers there).")
    if method == "id" and recipe.num_landmarks > len(pool_ids):
        # refuse before anything is embedded or written
        raise ConfigError(f"num_landmarks={recipe.num_landmarks} exceeds the pool size N={len(pool_ids)}; choose L <= N.")

    def timed(stage):
        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - self.start

        return _Timer()

    if method in ("random", "midppl", "rds", "less"):
        with timed("baseline"):
            outcome = baseline_outcome(
                method, model, tokenizer, pool_examples, target_examples, budget, recipe, source_of, target_subtasks=target_subtasks
            )
        return SelectionReport(outcome, timings, sizes, precision=precision)

    preconditioner = None
    grad_model = model
    if recipe.optimizer == "adam":
        import copy

        with timed("warmup"):
            grad_model = copy.deepcopy(model)
            preconditioner = warmup_preconditioner(grad_model, tokenizer, pool_examples, recipe, progress)
    with timed("target_gradients"):
        targets = compute_gradients(grad_model, tokenizer, target_examples, None, recipe.gradients, progress=progress)
    if method == "exact":
        with timed("pool_gradients"):
            outcome = exact_outcome(
                grad_model, tokenizer, pool_examples, targets.grads, budget, recipe, preconditioner,
                method=method, progress=progress, source_of=source_of,
            )
        return SelectionReport(outcome, timings, sizes, precision=precision)

    store = open_store(store_uri, store_table, model_fingerprint, recipe, model.config.hidden_size)
    with timed("embeddings"):
        embed_pool(
            model, tokenizer, pool_examples, store, recipe.embed, commit_every=commit_every, progress=progress,
            on_commit=on_commit, backend=backend, source=source,
        )
    emb = store.read(pool_ids) if recipe.landmarks.needs_embeddings else None
    landmark_ids, holdout_ids = choose_landmarks(
        pool_ids, recipe.num_landmarks, recipe.num_holdout, recipe.seed, recipe.landmarks, emb
    )
    with timed("landmark_gradients"):
        grads = compute_gradients(
            grad_model, tokenizer, pool_examples, landmark_ids + holdout_ids, recipe.gradients, preconditioner, progress,
            backend=backend, source=source,
        )
    lm_grads, ho_grads, target_grads = grads.grads[: len(landmark_ids)], grads.grads[len(landmark_ids) :], targets.grads
    center = None
    if recipe.center:
        from idistill_core.influence import center_gradients

        mean = lm_grads.mean(dim=0)  # ID only knows its landmarks' gradients

        def center(g):
            return center_gradients(g, mean)

        lm_grads, ho_grads, target_grads = center(lm_grads), center(ho_grads), center(target_grads)
    lm_values = landmark_values(lm_grads, target_grads, recipe.aggregate)
    ho_values = landmark_values(ho_grads, target_grads, recipe.aggregate)
    if recipe.landmarks.strategy == "adaptive" and len(landmark_ids) < recipe.num_landmarks:
        extra: list[torch.Tensor] = []

        def second_round_values(ids):
            g = compute_gradients(
                grad_model, tokenizer, pool_examples, ids, recipe.gradients, preconditioner, progress,
                backend=backend, source=source,
            ).grads
            g = center(g) if center is not None else g
            extra.append(g)  # kernel selection needs every landmark's gradient
            return landmark_values(g, target_grads, recipe.aggregate)

        with timed("landmark_gradients"):
            first_grads = lm_grads
            landmark_ids, lm_values = adaptive_round(
                store, pool_ids, landmark_ids, lm_values, holdout_ids, budget, recipe, second_round_values,
                landmark_grads=first_grads,
            )
            lm_grads = torch.cat([first_grads, *extra]) if extra else first_grads
    sizes.update(landmarks=len(landmark_ids), holdout=len(holdout_ids))
    second = None
    if recipe.order == "second":
        with timed("second_order"):
            second = second_order_terms_for(
                grad_model, tokenizer, pool_examples, target_examples, landmark_ids, recipe, preconditioner
            )
    with timed("coefficients"):
        coefficients, coefficient_report = shared_coefficients(
            store, pool_ids, landmark_ids, recipe.propagate, landmark_grads=lm_grads
        )
    outcome, rho, stage_times = landmark_outcome(
        coefficients, landmark_ids, lm_values, holdout_ids, ho_values, budget, recipe, second_order=second,
        source_of=source_of,
    )
    timings.update(stage_times)
    return SelectionReport(
        outcome, timings, sizes, fidelity=rho, precision=precision, propagation=coefficient_report.summary(),
        kernel_selection=coefficient_report.selection,
    )
