"""The real-data quality benchmark's comparison (``benchmarks.quality.run``) on planted features: every method runs
through the library code, and where the answer is known (the target's gradients and features are those of one pool
source) exact influence, ID and RDS+ find that source and random does not."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.quality.run import evaluate, summary_rows


def _planted_features(folder, n_per_source: int = 40, dim: int = 64, emb_dim: int = 16, seed: int = 0,
                      emb_separates: bool = True):
    """Three sources, each a cluster in gradient, embedding and RDS space sharing one direction per source;
    the target 'b' is 4 fresh draws of source b. ``emb_separates=False``: every source has the same JVP-embedding
    direction (only the final-hidden/RDS feature tells them apart)."""
    rng = np.random.default_rng(seed)
    sources = ["a", "b", "c"]
    grad_dirs, emb_dirs, rds_dirs = (rng.normal(size=(3, d)) for d in (dim, emb_dim, emb_dim))
    common = rng.normal(size=dim)  # what every gradient shares (centring removes it)
    if not emb_separates:
        emb_dirs[:] = emb_dirs[0]

    def draw(k: int, s: int):
        g = common + 2.0 * grad_dirs[s] + 0.6 * rng.normal(size=(k, dim))
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        e = emb_dirs[s] + 0.3 * rng.normal(size=(k, emb_dim))
        r = rds_dirs[s] + 0.3 * rng.normal(size=(k, emb_dim))
        return g.astype(np.float32), e.astype(np.float32), r.astype(np.float32)

    parts = [draw(n_per_source, s) for s in range(3)]
    pool_ids = [f"{src}{i:03d}" for src in sources for i in range(n_per_source)]
    tg, te, tr = draw(4, 1)
    arrays = {
        "pool_grads": np.concatenate([p[0] for p in parts]), "pool_emb": np.concatenate([p[1] for p in parts]),
        "pool_rds": np.concatenate([p[2] for p in parts]),
        "target_grads/b": tg, "target_emb/b": te, "target_rds/b": tr,
    }
    folder.mkdir()
    np.savez(folder / "features.npz", **arrays)
    meta = {"pool_ids": pool_ids, "sources": [s[0] for s in pool_ids],
            "targets": {"b": {"ids": [f"dev{i}" for i in range(4)]}}, "timings": {"pool_gradients": 1.0},
            "recipe": {}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_quality_comparison_finds_the_planted_source_and_random_does_not(tmp_path):
    features = _planted_features(tmp_path / "features-test")
    results = evaluate(features, landmarks=[16], seeds=[0, 1], budget=20)
    out = results["targets"]["b"]
    assert out["exact"]["centred-mean"] == 1.0 and out["exact"]["plain-mean"] == 1.0
    assert out["rds"] == 1.0
    assert out["random"] < 0.6  # a third of the pool is on target
    for key in ("paper/L16", "default/L16"):
        assert out["id"][key]["share_min"] >= 0.9, (key, out["id"][key])
        assert all(run["gradients"] >= 16 for run in out["id"][key]["runs"])
    # the default adds the target's own refinement landmarks; the paper's recipe does not
    assert out["id"]["default/L16"]["runs"][0]["gradients"] > out["id"]["paper/L16"]["runs"][0]["gradients"]
    (row,) = summary_rows({**results, "targets": {"b": out}})
    assert row["rds"] == 1.0 and row["exact centred"] == 1.0


def test_default_kernel_input_separates_sources_the_jvp_embedding_alone_cannot(tmp_path):
    """When the JVP embeddings of the sources coincide, the default (the unit final-hidden feature beside the JVP
    embedding) still propagates the target's influence to its own source; the JVP embedding alone cannot."""
    features = _planted_features(tmp_path / "features-test", emb_separates=False)
    out = evaluate(features, landmarks=[16], seeds=[0, 1, 2], budget=20)["targets"]["b"]
    assert out["exact"]["centred-mean"] == 1.0
    assert out["id"]["default/L16"]["share_min"] >= 0.9, out["id"]["default/L16"]
    assert out["id"]["jvp-only/L16"]["share_mean"] <= out["id"]["default/L16"]["share_mean"] - 0.2, out["id"]
