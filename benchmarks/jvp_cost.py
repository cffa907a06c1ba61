"""Benchmark 1: cost of JVP embeddings relative to plain forwards (paper §2.2; issue 7 item 1).

Per-sample time of ``JvpEmbedder.embed`` (k = 4 blocks, m = 2 tangents, projection included) divided by the
time of a no-grad forward through the same 4 blocks, and by a full-model forward (what RDS+ pays), on random
token ids at each sequence length. Forward-mode AD costs at least about 1 + 2m primal passes; the goal is
≤ 6.5× the 4-block forward for m = 2.

The 4-block forward is timed with eager attention (the kernels the JVP itself must use on CPU) and with sdpa;
``jvp_over_kblock_forward`` uses the eager one, so the ratio is the price of forward-mode AD and nothing else.
Variants: the tangent loop instead of ``vmap`` (``vmap_tangents=False``) and a bfloat16 pass.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import median_time, print_table, run_child, write_result

NAME = "jvp_cost"


def measure(
    model: str,
    device: str,
    seq_lens: list[int],
    batch_sizes: dict[str, int],
    repeats: int,
    warmup: int,
    num_blocks: int,
    num_tangents: int,
    proj_dim: int,
    variants: list[str],
    seed: int = 0,
) -> dict[str, Any]:
    """Child side: median batch times of every pass at each sequence length (see module docstring)."""
    import dataclasses

    import torch

    from benchmarks.common import load_bench_model
    from idistill_core.data.batch import TokenBatch
    from idistill_core.models.architecture import (
        TruncatedStack,
        attention_inputs,
        decoder_parts,
        eager_attention,
    )
    from idistill_core.steps.embed import EmbedConfig, JvpEmbedder

    net, _, _ = load_bench_model(model, device, seed)
    parts = decoder_parts(net)
    stack = TruncatedStack(parts, num_blocks)
    vocab = parts.embed_tokens.weight.shape[0]
    base = EmbedConfig(num_blocks=num_blocks, num_tangents=num_tangents, proj_dim=proj_dim, batch_size=1, dtype="float32",
                       hidden="none")  # the JVP against the forward of the same blocks: no final-hidden forward
    configs = {"jvp": base}
    if "loop" in variants:
        configs["jvp_loop"] = dataclasses.replace(base, vmap_tangents=False)
    if "bf16" in variants:
        configs["jvp_bf16"] = dataclasses.replace(base, dtype="bfloat16")
    rows = []
    for seq in seq_lens:
        batch = batch_sizes[str(seq)]
        gen = torch.Generator().manual_seed(seed + seq)
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        tokens = TokenBatch([f"r{i}" for i in range(batch)], ids, mask, ids.clone()).to(device)

        def kblock(tokens=tokens):
            with torch.no_grad():
                hidden = parts.embed_tokens(tokens.input_ids)
                masks, rope = attention_inputs(parts, tokens.attention_mask, num_blocks, hidden.dtype)
                return stack(hidden, masks, rope)

        def kblock_eager(kblock=kblock):
            with eager_attention(net):
                return kblock()

        def full(tokens=tokens):
            with torch.no_grad():
                return net(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits

        def full_no_head(tokens=tokens):
            with torch.no_grad():
                return net.model(
                    input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
                ).last_hidden_state

        passes = {
            "kblock_forward_eager": kblock_eager,
            "kblock_forward_sdpa": kblock,
            "full_forward": full,
            "full_forward_no_lm_head": full_no_head,
        }
        for name, cfg in configs.items():
            embedder = JvpEmbedder(net, dataclasses.replace(cfg, batch_size=batch))

            def jvp(embedder=embedder, tokens=tokens):
                with embedder.session():
                    return embedder.embed(tokens)

            passes[name] = jvp
        row: dict[str, Any] = {"seq": seq, "batch": batch}
        for name, fn in passes.items():
            timing = median_time(fn, repeats, warmup, device)
            row[f"{name}_s_per_sample"] = timing["median_s"] / batch
            row[f"{name}_times_s"] = timing["times_s"]
        rows.append(row)
        print(f"jvp_cost: seq {seq} done", flush=True)
    return {"rows": rows}


def run(
    params: dict[str, Any], results_dir: Path, work_dir: Path, profile: str, machine: dict, name: str = NAME
) -> dict:
    start = time.perf_counter()
    child = run_child(NAME, "measure", params)
    rows, table = [], []
    figures: dict[str, Any] = {
        "jvp_over_kblock_forward": {},
        "jvp_over_kblock_forward_sdpa": {},
        "jvp_over_full_forward": {},
        "jvp_per_tangent_over_kblock_forward": {},
    }
    m = params["num_tangents"]
    for row in child["rows"]:
        seq = str(row["seq"])
        jvp = row["jvp_s_per_sample"]
        figures["jvp_over_kblock_forward"][seq] = jvp / row["kblock_forward_eager_s_per_sample"]
        figures["jvp_over_kblock_forward_sdpa"][seq] = jvp / row["kblock_forward_sdpa_s_per_sample"]
        figures["jvp_over_full_forward"][seq] = jvp / row["full_forward_s_per_sample"]
        figures["jvp_per_tangent_over_kblock_forward"][seq] = (
            jvp / m / row["kblock_forward_eager_s_per_sample"]
        )
        for variant in ("jvp_loop", "jvp_bf16"):
            if f"{variant}_s_per_sample" in row:
                figures.setdefault(f"{variant}_over_jvp", {})[seq] = row[f"{variant}_s_per_sample"] / jvp
        figures.setdefault("full_forward_over_full_no_lm_head", {})[seq] = (
            row["full_forward_s_per_sample"] / row["full_forward_no_lm_head_s_per_sample"]
        )
        rows.append(row)
        table.append(
            {
                "seq": row["seq"],
                "batch": row["batch"],
                "JVP s/sample": jvp,
                "4-block fwd (eager) s/sample": row["kblock_forward_eager_s_per_sample"],
                "4-block fwd (sdpa) s/sample": row["kblock_forward_sdpa_s_per_sample"],
                "full fwd s/sample": row["full_forward_s_per_sample"],
                "JVP / 4-block fwd": figures["jvp_over_kblock_forward"][seq],
                "JVP / full fwd": figures["jvp_over_full_forward"][seq],
                "loop / vmap": figures.get("jvp_loop_over_jvp", {}).get(seq, float("nan")),
                "bf16 / fp32": figures.get("jvp_bf16_over_jvp", {}).get(seq, float("nan")),
            }
        )
    figures["goal_jvp_over_kblock_forward"] = 6.5
    figures["meets_goal"] = all(v <= 6.5 for v in figures["jvp_over_kblock_forward"].values())
    figures["peak_rss_gib"] = child["peak_rss_gib"]
    notes = [
        f"median of {params['repeats']} timed repeats after {params['warmup']} warm-up, per sample = batch time / batch",
        "random token ids, no padding; JVP includes the Rademacher projection to proj_dim",
        "jvp_over_kblock_forward divides by the eager-attention 4-block forward (same kernels as the JVP)",
    ]
    print_table(f"[1] JVP cost ({params['model']}, k={params['num_blocks']}, m={m})", table)
    write_result(
        results_dir, name, profile, params, figures, rows, notes, machine, time.perf_counter() - start
    )
    return figures
