"""Decoder internals of Llama/Qwen2/Mistral-style causal LMs, and a truncated forward through them.

The JVP embeddings (paper §2.2) need the normalised hidden state after the first ``k`` blocks without
running the rest of the model or the LM head, and without deep-copying a large model. This module
finds the parts (``model.model.{embed_tokens, layers, norm, rotary_emb}``) and runs
embed -> first ``k`` blocks -> final norm with the same attention masks and rotary position
embeddings the library itself builds (``transformers.masking_utils``), so the result equals
``norm(hidden_states[k])`` of a full forward.

Forward-mode AD needs eager attention: the CPU sdpa kernel has no forward-AD rule
(research/feasibility.md §1.3). ``eager_attention(model)`` switches a model for the duration of a pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from idistill_core.errors import ModelError

__all__ = [
    "DecoderParts",
    "TruncatedStack",
    "attention_inputs",
    "decoder_parts",
    "eager_attention",
    "truncated_forward",
]


@dataclass
class DecoderParts:
    """References (not copies) to the pieces of a decoder-only causal LM.

    Attributes:
        embed_tokens: the token embedding, weight ``(V, H)``.
        layers: all decoder blocks, in order.
        norm: the final norm applied before the LM head.
        rotary_emb: the module that turns position ids into ``(cos, sin)``.
        hidden_size: ``H``.
        config: the decoder's config (attention implementation, layer types).
    """

    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    rotary_emb: nn.Module
    hidden_size: int
    config: object


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Find the embedding, blocks, final norm and rotary embedding of a Llama/Qwen2/Mistral-style model.

    Args:
        model: a ``*ForCausalLM`` with ``model.model`` holding ``embed_tokens``, ``layers``, ``norm``
            and ``rotary_emb`` (Llama, Qwen2, Mistral and their relatives in transformers 5.x).

    Returns:
        The parts, sharing parameters with ``model``.

    Raises:
        ModelError: naming the model class when any part is missing.
    """
    inner = getattr(model, "model", None)
    missing = [
        name
        for name in ("embed_tokens", "layers", "norm", "rotary_emb")
        if inner is None or getattr(inner, name, None) is None
    ]
    if missing:
        raise ModelError(
            f"{type(model).__name__} is not a supported decoder (need model.model.{{embed_tokens,layers,"
            f"norm,rotary_emb}}; missing {', '.join(missing)}); use a Llama/Qwen2/Mistral-style model"
        )
    if not isinstance(inner.embed_tokens, nn.Embedding):
        raise ModelError(f"{type(model).__name__}.model.embed_tokens is not an nn.Embedding")
    return DecoderParts(
        embed_tokens=inner.embed_tokens,
        layers=inner.layers,
        norm=inner.norm,
        rotary_emb=inner.rotary_emb,
        hidden_size=int(inner.embed_tokens.weight.shape[1]),
        config=inner.config,
    )


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with eager attention inside the block, restoring its implementation afterwards.

    sdpa/flash kernels have no forward-AD rule and no vmap batching rule on CPU; eager attention is
    plain matmul + softmax and supports both.
    """
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if previous in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _layer_types(parts: DecoderParts, num_blocks: int) -> list[str]:
    types = getattr(parts.config, "layer_types", None)
    if not types:
        return ["full_attention"] * num_blocks
    return list(types[:num_blocks])


def attention_inputs(
    parts: DecoderParts,
    attention_mask: torch.Tensor,
    num_blocks: int,
    dtype: torch.dtype,
) -> tuple[list[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]:
    """Build the per-block 4D attention masks and rotary ``(cos, sin)`` the library would build.

    These depend only on the padding mask and positions, never on parameters, so they are computed
    once outside any ``jvp``/``vmap`` transform.

    Args:
        parts: from ``decoder_parts``; its config must be in eager mode (see ``eager_attention``).
        attention_mask: ``(B, S)`` 1 for real tokens (right padding).
        num_blocks: number of leading blocks that will be run.
        dtype: compute dtype of the hidden states.

    Returns:
        ``(masks, (cos, sin))``: one mask per block (``(B, 1, S, S)`` additive float, or None when
        the library decides none is needed) and the rotary tables ``(1, S, head_dim)``.
    """
    batch, seq = attention_mask.shape
    device = attention_mask.device
    # Only shape, dtype and device of the embeddings are read by the mask and rotary helpers.
    dummy = torch.zeros((batch, seq, parts.hidden_size), dtype=dtype, device=device)
    position_ids = torch.arange(seq, device=device).unsqueeze(0)
    kwargs = {
        "config": parts.config,
        "inputs_embeds": dummy,
        "attention_mask": attention_mask,
        "cache": None,
        "position_ids": position_ids,
    }
    built: dict[str, torch.Tensor | None] = {}
    masks = []
    for kind in _layer_types(parts, num_blocks):
        if kind not in built:
            builder = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            built[kind] = builder(**kwargs)
        masks.append(built[kind])
    with torch.no_grad():
        cos, sin = parts.rotary_emb(dummy, position_ids)
    return masks, (cos, sin)


class TruncatedStack(nn.Module):
    """The first ``k`` blocks plus the final norm, as one module sharing parameters with the model.

    Parameter names are ``layers.<i>.…`` and ``norm.…``; ``torch.func.functional_call`` can swap
    them for tangent-carrying or recast tensors without touching the model.
    """

    def __init__(self, parts: DecoderParts, num_blocks: int):
        super().__init__()
        if num_blocks < 1 or num_blocks > len(parts.layers):
            raise ModelError(
                f"num_blocks must be in [1, {len(parts.layers)}] for this model; got {num_blocks}"
            )
        self.layers = nn.ModuleList(list(parts.layers[:num_blocks]))
        self.norm = parts.norm

    def forward(
        self,
        hidden: torch.Tensor,
        masks: Sequence[torch.Tensor | None],
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """``hidden: (B, S, H)`` token embeddings -> ``(B, S, H)`` normed hidden state after block k."""
        for layer, mask in zip(self.layers, masks, strict=True):
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings)
        return self.norm(hidden)


def truncated_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_blocks: int,
) -> torch.Tensor:
    """Embed -> first ``num_blocks`` blocks -> final norm, with eager attention.

    Args:
        model: a model ``decoder_parts`` accepts.
        input_ids: ``(B, S)`` long, right-padded.
        attention_mask: ``(B, S)`` 1 for real tokens.
        num_blocks: ``k``, between 1 and the number of layers.

    Returns:
        ``(B, S, H)`` in the model dtype; equals ``norm(hidden_states[k])`` of the full model.
    """
    parts = decoder_parts(model)
    stack = TruncatedStack(parts, num_blocks)
    with eager_attention(model):
        hidden = parts.embed_tokens(input_ids)
        masks, rope = attention_inputs(parts, attention_mask, num_blocks, hidden.dtype)
        return stack(hidden, masks, rope)
