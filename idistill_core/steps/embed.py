"""Step 1: JVP embeddings of pool samples (paper §2.2, official ``create_jvp_store``).

For a sample ``x``, let ``h_k(x; θ)`` be the output of the first ``k`` decoder blocks followed by the
final norm (identity head, no LM head), at the sample's LAST real token. With ``m`` Gaussian tangents
``V_1..V_m`` over all parameters of the embedding, the ``k`` blocks and the final norm (drawn once
from ``seed`` and shared by every sample and batch), the embedding is

    e(x) = R^T [J_x V_1; ...; J_x V_m],   J_x = d h_k(x; θ) / dθ,

with ``R`` a ``(m*H, proj_dim)`` Rademacher matrix with entries ±1/sqrt(proj_dim)
(``projection.RademacherProjector``). When ``proj_dim`` is None or ``>= m*H`` the raw ``m*H`` vector
is returned unprojected (a JL map cannot reduce the dimension there; it would only rotate it).

With ``EmbedConfig.hidden = "final"`` (the default) the kernel's input is ``[e(x)/‖e(x)‖ ; r(x)]``: the unit JVP
embedding beside ``r(x)``, the position-weighted mean of the model's final hidden states at unit norm (the RDS+
feature, :func:`pooled_final_hidden`), one decoder forward per sample more. On the real benchmark
(BENCHMARKS.md "Selection quality on real data") the JVP embedding alone propagates influence well where tasks
differ in gradient geometry (long vs short answers) but not between tasks of one format (multiple-choice
science vs other multiple choice), where the final hidden state separates them; the two together beat either
alone on every target. ``"none"`` is the paper's embedding, unnormalised.

Implementation choices:
- No model copy: the truncated forward runs on the model's own blocks through
  ``torch.func.functional_call``; parameters are only re-cast when ``EmbedConfig.dtype`` differs.
- The embedding matrix tangent is ``(V, H)`` but the lookup is linear, so the output tangent of the
  embedding layer is just the tangent's rows for the batch's tokens: we gather those rows and feed
  them as the input tangent of the blocks. Exact, and it avoids a ``(V, H)`` dual tensor.
- Batched over samples (right padding; padding-aware causal masks from ``transformers``) and over
  tangents with ``torch.func.vmap`` over ``torch.func.jvp``: the primal pass is shared by the ``m``
  tangents (faster on CPU, see ``EmbedConfig.vmap_tangents``).
- Attention runs eager for the pass (the CPU sdpa kernel has no forward-AD rule); the model's
  attention implementation and train/eval mode are restored afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, vmap
from tqdm.auto import tqdm

from idistill_core.data.batch import TokenBatch
from idistill_core.errors import ConfigError, NumericalError
from idistill_core.models.architecture import (
    DecoderParts,
    TruncatedStack,
    attention_inputs,
    decoder_parts,
    eager_attention,
)
from idistill_core.models.precision import PrecisionDecision, PrecisionResolver
from idistill_core.steps.projection import RademacherProjector
from idistill_core.store.hashing import config_fingerprint

__all__ = ["EmbedConfig", "JvpEmbedder", "draw_tangents", "embed_samples", "jvp_parameters", "pooled_final_hidden"]

logger = logging.getLogger("idistill")

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
HIDDEN = ("final", "none")
EMBED_NAME = "embed_tokens.weight"


@dataclass(frozen=True)
class EmbedConfig:
    """How JVP embeddings are computed (paper §2.2; defaults of the official code)."""

    num_blocks: int = 4
    """``k``: leading decoder blocks in the truncated model; >= 1 and <= the model's layer count."""
    num_tangents: int = 2
    """``m``: shared random Gaussian tangent directions; the raw embedding has ``m * H`` entries."""
    proj_dim: int | None = 4096
    """``D``: Rademacher projection size; None, or a value >= ``m * H``, keeps the raw ``m * H`` vector."""
    seed: int = 43
    """Seeds the tangents and the projection matrix (each from its own local generator)."""
    batch_size: int = 8
    """Rows per JVP pass; larger incoming batches are split into chunks of this many rows."""
    dtype: str = "auto"
    """Compute dtype of the pass: ``auto`` (bfloat16 where the device runs it natively and faster, else
    float32; ``precision.PrecisionResolver``), ``float32``, ``float64`` or ``bfloat16``; outputs are float32."""
    vmap_tangents: bool = True
    """Batch the ``m`` tangents with ``vmap`` (one shared primal pass) instead of a loop over tangents.
    On SmolLM2-135M (CPU, k=4, m=2, batch 8, ~100 tokens) vmap was 1.2-2.8x faster than the loop."""
    hidden: str = "final"
    """``final``: append the unit final-hidden-state feature (:func:`pooled_final_hidden`, ``H`` entries) to the
    unit JVP embedding (module docstring); ``none``: the paper's JVP embedding alone."""

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= 2**32 - 1:
            raise ConfigError(f"EmbedConfig.seed must be in [0, 2**32 - 1]; got {self.seed}")
        if self.num_blocks < 1:
            raise ConfigError(f"EmbedConfig.num_blocks must be >= 1; got {self.num_blocks}")
        if self.num_tangents < 1:
            raise ConfigError(f"EmbedConfig.num_tangents must be >= 1; got {self.num_tangents}")
        if self.proj_dim is not None and self.proj_dim < 1:
            raise ConfigError(f"EmbedConfig.proj_dim must be >= 1 or None; got {self.proj_dim}")
        if self.batch_size < 1:
            raise ConfigError(f"EmbedConfig.batch_size must be >= 1; got {self.batch_size}")
        if self.dtype not in _DTYPES and self.dtype != "auto":
            raise ConfigError(f"EmbedConfig.dtype must be 'auto' or one of {sorted(_DTYPES)}; got {self.dtype!r}")
        if self.hidden not in HIDDEN:
            raise ConfigError(f"EmbedConfig.hidden must be one of {list(HIDDEN)}; got {self.hidden!r}")

    def fingerprint(self) -> str:
        return config_fingerprint(self)

    def resolved(
        self, model: nn.Module, resolver: PrecisionResolver | None = None
    ) -> tuple[EmbedConfig, PrecisionDecision]:
        """This config with ``dtype`` made concrete for ``model``'s device, and the decision behind it.

        Resolve before fingerprinting (the embedding store's identity), so vectors computed in different
        dtypes never share a table.
        """
        decision = (resolver or PrecisionResolver()).resolve_for_model(self.dtype, model)
        return dataclasses.replace(self, dtype=decision.dtype), decision

    def output_dim(self, hidden_size: int) -> int:
        """``D`` for a model of hidden size ``H`` (the JVP part, plus ``H`` with ``hidden='final'``)."""
        raw = self.num_tangents * hidden_size
        jvp_dim = raw if self.proj_dim is None or self.proj_dim >= raw else self.proj_dim
        return jvp_dim + (hidden_size if self.hidden == "final" else 0)


def jvp_parameters(model: nn.Module, num_blocks: int) -> dict[str, nn.Parameter]:
    """The parameter set ``P`` of the JVP: embedding, first ``num_blocks`` blocks, final norm.

    Returns:
        Ordered ``{name: parameter}`` (the model's own tensors) with names ``embed_tokens.weight``,
        ``layers.<i>.…`` and ``norm.…``; this order fixes the order tangents are drawn in.
    """
    parts = decoder_parts(model)
    stack = TruncatedStack(parts, num_blocks)
    params = {EMBED_NAME: parts.embed_tokens.weight}
    params.update(dict(stack.named_parameters()))
    return params


def draw_tangents(
    params: dict[str, torch.Tensor], num_tangents: int, seed: int, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Standard Gaussian tangents ``{name: (m, *shape)}``, shared by all samples.

    Drawn in float32 from one ``torch.Generator(seed)`` in ``params`` order, then cast to ``dtype``
    (default: each parameter's dtype), so models in different dtypes get the same directions.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in params.items():
        draw = torch.randn((num_tangents, *p.shape), generator=gen, dtype=torch.float32)
        out[name] = draw.to(dtype=dtype or p.dtype, device=p.device)
    return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class JvpEmbedder:
    """Holds the truncated stack, tangents and projector for one model and config.

    Build once per pass over a pool; ``raw`` and ``embed`` must run inside ``session()``.
    """

    def __init__(self, model: nn.Module, config: EmbedConfig, resolver: PrecisionResolver | None = None):
        config, self.precision = config.resolved(model, resolver)
        self.model = model
        self.config = config
        self.parts: DecoderParts = decoder_parts(model)
        self.stack = TruncatedStack(self.parts, config.num_blocks)
        self.dtype = _DTYPES[config.dtype]
        params = jvp_parameters(model, config.num_blocks)
        tangents = draw_tangents(params, config.num_tangents, config.seed, self.dtype)
        self.embed_weight = params.pop(EMBED_NAME).detach()
        self.embed_tangent = tangents.pop(EMBED_NAME)  # (m, V, H)
        # .to() is a no-op (no copy) when the model is already in the compute dtype.
        self.params = {name: p.detach().to(self.dtype) for name, p in params.items()}
        self.tangents = tangents
        raw_dim = config.num_tangents * self.parts.hidden_size
        self.dim = config.output_dim(self.parts.hidden_size)
        jvp_dim = dataclasses.replace(config, hidden="none").output_dim(self.parts.hidden_size)
        self.projector = (
            RademacherProjector(raw_dim, jvp_dim, seed=config.seed) if jvp_dim < raw_dim else None
        )

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with eager_attention(self.model), _eval_mode(self.model), torch.no_grad():
            yield

    def raw(self, batch: TokenBatch) -> torch.Tensor:
        """Unprojected JVPs at each row's last real token.

        Args:
            batch: right-padded, ``B`` rows.

        Returns:
            ``(B, m, H)`` in the compute dtype: ``[b, i] = J_{x_b} V_i``.
        """
        device = self.embed_weight.device
        input_ids = batch.input_ids.to(device)
        attention_mask = batch.attention_mask.to(device)
        rows = torch.arange(len(batch), device=device)
        last = batch.last_token_index().to(device)
        masks, rope = attention_inputs(self.parts, attention_mask, self.config.num_blocks, self.dtype)
        hidden = self.embed_weight[input_ids].to(self.dtype)  # (B, S, H)
        hidden_tangents = self.embed_tangent[:, input_ids]  # (m, B, S, H): rows of the used tokens only

        def blocks(h, params):
            return functional_call(self.stack, params, (h, masks, rope))

        def one_tangent(h_tangent, p_tangent):
            _, out_tangent = jvp(blocks, (hidden, self.params), (h_tangent, p_tangent))
            return out_tangent[rows, last]  # (B, H)

        if self.config.vmap_tangents:
            out = vmap(one_tangent)(hidden_tangents, self.tangents)
        else:
            out = torch.stack(
                [
                    one_tangent(hidden_tangents[i], {n: t[i] for n, t in self.tangents.items()})
                    for i in range(self.config.num_tangents)
                ]
            )
        return out.transpose(0, 1)  # (B, m, H)

    def embed(self, batch: TokenBatch) -> np.ndarray:
        """``(B, D)`` float32 embeddings of one batch (split into ``config.batch_size`` chunks)."""
        chunks = []
        for start in range(0, len(batch), self.config.batch_size):
            rows = list(range(start, min(start + self.config.batch_size, len(batch))))
            part = batch if len(rows) == len(batch) else batch.select(rows)
            raw = self.raw(part)
            flat = raw.reshape(len(rows), -1).float()  # tangent-major: [J V_1, J V_2, ...]
            jvp_part = flat if self.projector is None else self.projector.project(flat)
            if self.config.hidden == "final":
                # each half at unit norm, so neither outweighs the other in the kernel's distances
                jvp_part = torch.cat([F.normalize(jvp_part, dim=1), pooled_final_hidden(self.model, part)], dim=1)
            chunks.append(jvp_part)
        out = torch.cat(chunks)
        bad = ~torch.isfinite(out).all(dim=1)
        if bad.any():
            raise NumericalError(
                f"sample {batch.sample_ids[int(bad.nonzero()[0])]!r}: non-finite JVP embedding"
            )
        return out.cpu().numpy()


@torch.no_grad()
def pooled_final_hidden(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """``(B, H)`` float32: the position-weighted mean of the final-normed last hidden states, unit norm (the
    RDS+ feature, paper §9.3; SGPT weighted mean pooling).

    Token ``j`` (0-based, real tokens only) gets weight ``(j + 1) / Σ(j' + 1)``; right padding is masked out, so
    padding never changes a feature. Runs the decoder alone (no LM head logits) in the model's own dtype.
    """
    device = next(model.parameters()).device
    batch = batch.to(device)
    out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    hidden = out.last_hidden_state.float()  # (B, S, H)
    mask = batch.attention_mask.float()
    weights = torch.cumsum(mask, dim=1) * mask  # position + 1 on real tokens, 0 on padding
    weights = weights / weights.sum(dim=1, keepdim=True)
    pooled = (weights.unsqueeze(-1) * hidden).sum(dim=1)
    if not bool(torch.isfinite(pooled).all()):
        bad = int((~torch.isfinite(pooled)).any(dim=1).nonzero()[0])
        raise NumericalError(f"non-finite final hidden state for sample '{batch.sample_ids[bad]}'")
    return F.normalize(pooled, dim=1).cpu()


def embed_samples(
    model: nn.Module,
    batches: Iterable[TokenBatch],
    config: EmbedConfig = EmbedConfig(),
    progress: bool = False,
    resolver: PrecisionResolver | None = None,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream JVP embeddings, one result per input batch.

    Args:
        model: a Llama/Qwen2/Mistral-style causal LM (not modified; attention runs eager meanwhile).
        batches: right-padded ``TokenBatch``es; labels are ignored.
        config: see ``EmbedConfig``.
        progress: show a tqdm bar over batches.
        resolver: resolves ``config.dtype == "auto"`` (a fresh one when None).

    Yields:
        ``(sample_ids, emb)`` with ``emb: (B, D) float32`` numpy, ``D = config.output_dim(H)``.

    Raises:
        ModelError: unsupported architecture or too few layers.
        NumericalError: a non-finite embedding, naming the sample id.
    """
    embedder = JvpEmbedder(model, config, resolver)
    logger.info(
        "JVP embeddings: %d blocks, %d tangents, dim %d, dtype %s",
        config.num_blocks,
        config.num_tangents,
        embedder.dim,
        embedder.precision.summary(),
    )
    for batch in tqdm(batches, disable=not progress, desc="jvp embeddings", unit="batch"):
        with embedder.session():
            emb = embedder.embed(batch)
        yield list(batch.sample_ids), emb
