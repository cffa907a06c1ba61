"""The JVP embedding is taken at each sample's last real token: checked by finite differences (issue 15)."""

import torch
from torch.func import functional_call

from idistill_core.data.batch import TokenBatch
from idistill_core.steps.embed import EmbedConfig, JvpEmbedder, attention_inputs
from tests.conftest import tiny_llama


def test_jvp_embedding_is_the_directional_derivative_at_the_last_real_token():
    model = tiny_llama(seed=0, fork_rng=True).double()
    lengths = [6, 3]  # right padding; the last real tokens sit at positions 5 and 2
    ids = torch.tensor([[3, 9, 4, 7, 11, 5], [8, 2, 6, 0, 0, 0]])
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    batch = TokenBatch(["a", "b"], ids, mask, ids.clone())
    config = EmbedConfig(hidden="none", num_blocks=2, num_tangents=2, proj_dim=None, dtype="float64")
    embedder = JvpEmbedder(model, config)
    with embedder.session():
        raw = embedder.raw(batch)  # (B, m, H)
        masks, rope = attention_inputs(embedder.parts, mask, config.num_blocks, torch.float64)

        def output(eps: float, i: int) -> torch.Tensor:
            params = {n: p + eps * embedder.tangents[n][i] for n, p in embedder.params.items()}
            hidden = (embedder.embed_weight + eps * embedder.embed_tangent[i])[ids]
            return functional_call(embedder.stack, params, (hidden, masks, rope))

        eps = 1e-4  # rope tables are float32: a much smaller step drowns in their rounding
        for i in range(config.num_tangents):
            derivative = (output(eps, i) - output(-eps, i)) / (2 * eps)  # (B, S, H), central difference
            for b, n in enumerate(lengths):
                scale = derivative[b, n - 1].abs().max()
                assert torch.allclose(raw[b, i], derivative[b, n - 1], atol=1e-4 * scale, rtol=0)
                # one token earlier is a different vector: a shifted position cannot pass the check above
                assert (raw[b, i] - derivative[b, n - 2]).abs().max() > 0.1 * scale
