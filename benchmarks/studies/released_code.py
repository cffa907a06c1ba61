"""Benchmark: our default gradient + sketch vs the paper's released code's unprojected gradient (issue 24).

The released code (github.com/MNikdan/influence_distillation) is NOT part of this repository: fetch it and give it
its own environment, then point this script at both::

    git clone <mirror of MNikdan/influence_distillation> /tmp/infdist_src
    python3.11 -m venv /tmp/infdist_venv
    /tmp/infdist_venv/bin/pip install torch==2.13.0 transformers==4.49.0 numpy==1.26.4 tqdm==4.67.1 traker==0.3.2
    OMP_NUM_THREADS=1 python -m benchmarks.studies.released_code --src /tmp/infdist_src \\
        --python /tmp/infdist_venv/bin/python --rows 32

Two worker processes, each on one thread, answer one row at a time and are driven in turn (released, ours, released,
...), so load on the machine hits both alike:

- ``released``: its own per-sample path, ``infdist.distil._create_grad_store`` on a one-row loader (``calc_grad``:
  the HF loss and ``torch.autograd.grad`` over every ``down_proj`` weight; unit norm; ``projector=None`` keeps the
  unprojected gradient, as the issue's 0.98 s/sample figure). Its pinned torch 2.5.1 has no wheel for this Python;
  the nearest release on disk, torch 2.13.0 (the one our environment uses), is installed, with its pinned
  transformers 4.49.0. ``infdist.utils.proj`` imports ``fast_hadamard_transform`` (a CUDA extension) at import
  time; it is never called with ``projector=None``, so the worker registers an empty module of that name.
- ``ours``: ``steps.gradients.iter_gradients`` with one reducer kept across rows (as a pipeline pass keeps it), in
  four variants: the default ``GradientConfig()`` (``auto`` precision, its default sketch), float32 CountSketch,
  float32 SRHT and float32 unprojected.

Both read the same token ids and labels (our chat rendering, max length 192) and the same weights (the cached
SmolLM2-135M-Instruct safetensors, eager attention; transformers 4.49 does not read the ``rope_parameters`` key of
the cached config, so the worker passes ``rope_theta`` from it). Per row the losses of the two sides are compared
(they must agree to float32 rounding), and at the end the inner products between all rows' gradients of each variant
are compared with the released code's unprojected float32 ones (Pearson and Spearman over the off-diagonal pairs).

Writes ``benchmarks/results/released_code.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

NAME = "released_code"
MODEL = "smollm2-135m-instruct"
MAX_LENGTH = 192
OUR_VARIANTS = {
    "default": {},
    "float32_countsketch": {"dtype": "float32", "proj_type": "countsketch"},
    "float32_srht": {"dtype": "float32", "proj_type": "srht"},
    "float32_unprojected": {"dtype": "float32", "proj_dim": None},
}


# ---------------------------------------------------------------------------------------------------------
# workers: one JSON command per stdin line, one JSON answer per line on the original stdout
# ---------------------------------------------------------------------------------------------------------
def _protocol():
    """The answer stream (the original stdout); from here on prints and progress bars go to stderr."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _gram(vectors: list) -> list[list[float]]:
    """Inner products of every pair of float32 vectors, accumulated in float64 one row at a time (a float64 stack
    of 26.5M-coordinate rows would not fit next to the model)."""
    import numpy as np

    n = len(vectors)
    gram = np.zeros((n, n))
    for i in range(n):
        row = vectors[i].astype(np.float64)
        for j in range(i + 1):
            gram[i, j] = gram[j, i] = float(row @ vectors[j])  # float64 row, float32 column: float64 products
    return gram.tolist()


def _serve(handle, out) -> None:
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            break
        out.write(json.dumps(handle(command)) + "\n")
        out.flush()


def worker_released(src: str, model_dir: str, rows_path: str) -> None:
    """Runs in the released code's environment: nothing of ours is imported."""
    import types

    out = _protocol()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    # after transformers (which probes for the package by spec): a CUDA extension, never reached with projector=None
    stub = types.ModuleType("fast_hadamard_transform")
    stub.hadamard_transform = None
    sys.modules.setdefault("fast_hadamard_transform", stub)
    sys.path.insert(0, src)
    from infdist.distil import _create_grad_store, _get_params

    torch.set_num_threads(1)
    config = json.loads(Path(model_dir, "config.json").read_text())
    rope = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager", rope_theta=rope
    )
    model.eval()
    params = _get_params(model, param_subset="down_proj")
    rows = json.loads(Path(rows_path).read_text())
    kept: dict[int, np.ndarray] = {}

    def sample(i):
        return {"input_ids": torch.tensor([rows[i]["input_ids"]]), "labels": torch.tensor([rows[i]["labels"]])}

    def handle(command):
        if "gram" in command:
            order = command["gram"]
            return {"gram": _gram([kept[i] for i in order]), "torch": torch.__version__,
                    "coordinates": int(kept[order[0]].shape[0])}
        i = command["row"]
        batch = sample(i)
        start, cpu = time.perf_counter(), time.thread_time()
        store = _create_grad_store(model, [batch], params, None, None, None, 1, out_device="cpu", normalize=True)
        wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
        if command.get("keep"):
            kept[i] = store[0].numpy()
        with torch.no_grad():
            loss = float(model(**batch).loss)
        return {"seconds": wall, "cpu_seconds": cpu, "loss": loss}

    _serve(handle, out)


def worker_ours(rows_path: str) -> None:
    import dataclasses

    out = _protocol()

    import numpy as np
    import torch

    from idistill_core.data.batch import collate
    from idistill_core.models.loading import load_model
    from idistill_core.models.precision import PrecisionResolver
    from idistill_core.steps.gradients import GradientConfig, iter_gradients, mean_token_loss

    torch.set_num_threads(1)
    loaded = load_model(MODEL, attn_implementation="eager")
    model = loaded.model
    model.eval()
    rows = json.loads(Path(rows_path).read_text())
    resolver = PrecisionResolver()
    streams, pending, configs = {}, {}, {}
    for name, fields in OUR_VARIANTS.items():
        configs[name] = dataclasses.replace(GradientConfig(), **fields)
        pending[name] = []
        # one reducer per variant for the whole run: iter_gradients is a generator fed one batch at a time
        streams[name] = iter_gradients(model, _Refill(pending[name]), configs[name], resolver=resolver)
    kept: dict[str, dict[int, np.ndarray]] = {name: {} for name in OUR_VARIANTS}

    def handle(command):
        if "gram" in command:
            order = command["gram"]
            grams = {name: _gram([kept[name][i] for i in order]) for name in OUR_VARIANTS}
            decision = resolver.resolve_for_model(GradientConfig().dtype, model, workload="gradients")
            return {"grams": grams, "decision": decision.as_metadata(),
                    "configs": {n: dataclasses.asdict(c) for n, c in configs.items()}}
        i, name = command["row"], command["variant"]
        batch = collate([rows[i]], pad_token_id=0)
        pending[name].append(batch)
        start, cpu = time.perf_counter(), time.thread_time()
        _, grads = next(streams[name])
        wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
        if command.get("keep"):
            kept[name][i] = grads[0].numpy()
        with torch.no_grad():
            loss = float(mean_token_loss(model(input_ids=batch.input_ids).logits, batch.labels)[0])
        return {"seconds": wall, "cpu_seconds": cpu, "loss": loss}

    _serve(handle, out)


class _Refill:
    """An endless iterator over a list that the driver refills before each ``next`` (one batch per request)."""

    def __init__(self, queue: list):
        self.queue = queue

    def __iter__(self):
        return self

    def __next__(self):
        if not self.queue:
            raise StopIteration
        return self.queue.pop()


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------
class _Worker:
    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[:4]} died (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def _rows(num_rows: int, seed: int, realdata: Path) -> list[dict]:
    import random

    from benchmarks.common import tokenized
    from idistill_core.models.loading import load_model

    tokenizer = load_model(MODEL).tokenizer
    pool = tokenized(realdata / "pool.jsonl", tokenizer, MAX_LENGTH)
    picked = sorted(random.Random(seed).sample(range(len(pool)), num_rows))
    return [
        {"sample_id": pool[i]["sample_id"], "input_ids": list(pool[i]["input_ids"]), "labels": list(pool[i]["labels"])}
        for i in picked
    ]


def _off_diagonal(gram):
    import numpy as np

    g = np.asarray(gram)
    return g[~np.eye(len(g), dtype=bool)]


def measure(src: str, python: str, num_rows: int, seed: int, work: Path, gram_rows: int = 20) -> dict:
    import statistics

    import numpy as np
    from scipy.stats import spearmanr

    from benchmarks.common import REPO_ROOT

    rows = _rows(num_rows + 1, seed, REPO_ROOT / ".idistill" / "realdata")  # row 0 warms both sides up
    rows_path = work / "rows.json"
    rows_path.write_text(json.dumps(rows))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    model_dir = str(REPO_ROOT / ".idistill" / "cache" / MODEL)
    here = str(Path(__file__).resolve())
    released = _Worker([python, here, "--worker", "released", src, model_dir, str(rows_path)], env)
    ours = _Worker([sys.executable, "-m", "benchmarks.studies.released_code", "--worker", "ours", str(rows_path)],
                   {**env, "PYTHONPATH": str(REPO_ROOT)})
    per_row = []
    compared = list(range(1, min(len(rows), gram_rows + 1)))  # rows whose gradients are kept for the inner products
    try:
        for i in range(len(rows)):
            warm = i == 0
            record = {"row": i, "sample_id": rows[i]["sample_id"], "tokens": len(rows[i]["input_ids"]), "warm_up": warm}
            record["released"] = released.ask({"row": i, "keep": i in compared})
            for name in OUR_VARIANTS:
                record[name] = ours.ask({"row": i, "variant": name, "keep": i in compared})
            per_row.append(record)
            print(json.dumps({k: (v["seconds"] if isinstance(v, dict) else v) for k, v in record.items()}), flush=True)
        order = compared
        reference = released.ask({"gram": order})
        mine = ours.ask({"gram": order})
    finally:
        released.close()
        ours.close()
    timed = [r for r in per_row if not r["warm_up"]]
    med = {name: statistics.median(r[name]["seconds"] for r in timed) for name in ["released", *OUR_VARIANTS]}
    cpu = {name: statistics.median(r[name]["cpu_seconds"] for r in timed) for name in ["released", *OUR_VARIANTS]}
    ratios = [r["released"]["seconds"] / r["default"]["seconds"] for r in timed]
    cpu_ratios = {name: [r["released"]["cpu_seconds"] / r[name]["cpu_seconds"] for r in timed] for name in OUR_VARIANTS}
    exact = _off_diagonal(reference["gram"])
    agreement = {}
    for name, gram in mine["grams"].items():
        values = _off_diagonal(gram)
        agreement[name] = {
            "pearson": round(float(np.corrcoef(values, exact)[0, 1]), 4),
            "spearman": round(float(spearmanr(values, exact).statistic), 4),
        }
    loss_gap = max(abs(r["released"]["loss"] - r["default"]["loss"]) / abs(r["released"]["loss"]) for r in per_row)
    figures = {
        "rows_timed": len(timed),
        "released_s_per_sample": round(med["released"], 4),
        **{f"ours_{name}_s_per_sample": round(med[name], 4) for name in OUR_VARIANTS},
        **{f"speedup_{name}": round(med["released"] / med[name], 2) for name in OUR_VARIANTS},
        "speedup_default_per_row_median": round(statistics.median(ratios), 2),
        "speedup_default_per_row_range": [round(min(ratios), 2), round(max(ratios), 2)],
        "released_cpu_s_per_sample": round(cpu["released"], 4),
        **{f"ours_{name}_cpu_s_per_sample": round(cpu[name], 4) for name in OUR_VARIANTS},
        **{f"cpu_speedup_{name}": round(cpu["released"] / cpu[name], 2) for name in OUR_VARIANTS},
        **{f"cpu_speedup_{name}_per_row_median": round(statistics.median(v), 2) for name, v in cpu_ratios.items()},
        "rows_in_inner_products": len(order),
        "inner_products_vs_released_unprojected": agreement,
        "max_relative_loss_gap": loss_gap,
        "default_decision": mine["decision"],
        "released_torch": reference["torch"],
        "coordinates": reference["coordinates"],
    }
    return {"figures": figures, "per_row": per_row, "configs": mine["configs"]}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        if sys.argv[2] == "released":
            worker_released(*sys.argv[3:6])
        else:
            worker_ours(sys.argv[3])
        return
    import tempfile

    from benchmarks.common import RESULTS_DIR, git_commit, machine_info, utc_now, write_result

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", default="/tmp/infdist_src", help="checkout of MNikdan/influence_distillation")
    parser.add_argument("--python", default="/tmp/infdist_venv/bin/python", help="its environment's interpreter")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--gram-rows", type=int, default=20, help="timed rows whose gradients are compared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    machine = {**machine_info(), "started_utc": utc_now(), "git_commit": git_commit()}
    commit = subprocess.run(
        ["git", "-C", args.src, "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="released-code-") as tmp:
        result = measure(args.src, args.python, args.rows, args.seed, Path(tmp), args.gram_rows)
    figures = result["figures"]
    print(json.dumps(figures, indent=1))
    params = {"rows": args.rows, "gram_rows": args.gram_rows, "seed": args.seed, "model": MODEL, "max_length": MAX_LENGTH,
              "released_commit": commit, "our_variants": result["configs"], "pool": "realdata/pool.jsonl"}
    notes = [
        ("Interleaved per row (released, then our four variants), two processes on one thread each; row 0 is a "
         "warm-up on both sides and not timed. Speed-ups are ratios of medians measured in the same run."),
        ("Released side: torch 2.13.0 (its pin, 2.5.1, has no wheel for this Python) with its pinned transformers "
         "4.49.0; fast_hadamard_transform stubbed (CUDA-only, unused with projector=None)."),
    ]
    write_result(args.out, NAME, "cli", params, figures, result["per_row"], notes, machine, time.perf_counter() - start)


if __name__ == "__main__":
    main()
