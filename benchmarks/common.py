"""Shared plumbing of the benchmarks: machine info, one child process per measurement, timers, JSON, tables.

Peak memory is measured per child process: :func:`run_child` starts ``python -m benchmarks.common`` for one
measurement function and reaps it with ``os.wait4``, whose ``ru_maxrss`` belongs to that child alone, so the
peak of one benchmark never leaks into the next (``RUSAGE_CHILDREN`` would report the maximum over all).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
GIB = 1024**3


# ---------------------------------------------------------------------------------------------------------
# machine and provenance
# ---------------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    """The CPU's model name with its family and model numbers: VMs often report only "AMD EPYC", which names
    several generations (an AVX2-only Zen 3 and a Zen 5 with native bfloat16 differ by 4x in these figures)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first processor is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / GIB, 1)
    except OSError:
        pass
    return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, memory, load, library versions, GPU if any."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "memory_gib": _mem_total_gib(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "forced_kernels": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
    }
    from idistill_core.models.precision import cpu_bf16_capability

    info["cpu_bf16"] = cpu_bf16_capability()[1]
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a project dependency
        pass
    return info


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------------
# one child process per measurement
# ---------------------------------------------------------------------------------------------------------
class ChildError(RuntimeError):
    """A measurement child exited with a non-zero status."""


def run_child(
    module: str, function: str, kwargs: dict[str, Any], timeout_s: float | None = None
) -> dict[str, Any]:
    """Run ``benchmarks.<module>.<function>(**kwargs)`` in a fresh interpreter.

    Returns:
        The function's JSON result plus ``peak_rss_gib`` (that child's own peak) and ``child_wall_s``.

    Raises:
        ChildError: the child failed (its traceback went to stderr) or ran past ``timeout_s``.
    """
    with tempfile.TemporaryDirectory(prefix="idistill-bench-") as tmp:
        arg_path, out_path = Path(tmp) / "args.json", Path(tmp) / "out.json"
        arg_path.write_text(json.dumps(kwargs))
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.common", module, function, str(arg_path), str(out_path)],
            cwd=REPO_ROOT,
        )
        deadline = None if timeout_s is None else start + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise ChildError(f"benchmarks.{module}.{function} ran past {timeout_s:.0f} s and was stopped")
            time.sleep(0.05)
        # Reaped by wait4 above; tell Popen so it does not try to wait on a recycled pid.
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not out_path.exists():
            raise ChildError(f"benchmarks.{module}.{function} failed with exit status {proc.returncode}")
        result = json.loads(out_path.read_text())
    # Linux reports ru_maxrss in KiB.
    result["peak_rss_gib"] = round(usage.ru_maxrss * 1024 / GIB, 3)
    result["child_wall_s"] = round(wall, 2)
    return result


def hold_memory(mib: int) -> dict[str, Any]:
    """Touch ``mib`` MiB and return; a known peak for checking that child peaks are measured per child."""
    block = bytearray(mib * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return {"held_mib": mib}


def _child_main(argv: Sequence[str]) -> None:
    module, function, arg_path, out_path = argv
    kwargs = json.loads(Path(arg_path).read_text())
    fn = getattr(importlib.import_module(f"benchmarks.{module}"), function)
    result = fn(**kwargs)
    Path(out_path).write_text(json.dumps(result, default=_json_default))


# ---------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1, device: str = "cpu") -> dict[str, Any]:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    Returns:
        ``{"median_s", "times_s"}``.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": [round(t, 5) for t in times]}


class Stopwatch:
    """Accumulates wall time per stage name: ``with watch("embed"): ...``."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str):
        watch = self

        class _Stage:
            def __enter__(self):
                synchronize(watch.device)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                synchronize(watch.device)
                watch.seconds[stage] = watch.seconds.get(stage, 0.0) + time.perf_counter() - self.start

        return _Stage()


# ---------------------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------------------
RANDOM_LLAMA_1B = {
    # Llama-3.2-1B's shape (random weights: timings and the landmark approximation do not need trained ones).
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}


def load_bench_model(spec: str, device: str = "cpu", seed: int = 0):
    """``(model, tokenizer, fingerprint)`` for a library model spec, or ``random-llama-1b`` (a 1.2B-shaped
    Llama with seeded random weights and the tiny byte-level tokenizer; no download)."""
    import torch

    if spec == "random-llama-1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        from idistill_core.models.loading import model_fingerprint
        from idistill_core.models.tokenizer import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            attn_implementation="sdpa",
            **RANDOM_LLAMA_1B,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.eval()
        model = model.to(device)
        return model, tokenizer, model_fingerprint(model)
    from idistill_core.models.loading import load_model

    loaded = load_model(spec, seed=seed)
    return loaded.model.to(device), loaded.tokenizer, loaded.fingerprint


def builtin_data(work_dir: str | Path, pool_size: int, seed: int = 0, gsm8k: bool = False) -> Path:
    """The built-in pool and targets written once per work dir and size; returns the folder.

    With ``gsm8k`` the real GSM8K target (16 dev and 16 test problems from the model cache) is added once too.
    """
    from idistill_core.data.builtin import write_builtin

    out = Path(work_dir) / f"builtin_{pool_size}_{seed}"
    if not (out / "builtin.json").exists():
        write_builtin(out, pool_size=pool_size, seed=seed)
    if gsm8k and not (out / "targets" / "gsm8k" / "dev.jsonl").exists():
        from idistill_core.data.builtin import write_gsm8k
        from idistill_core.models.loading import default_cache_dir

        write_gsm8k(out, default_cache_dir(), dev_size=16, test_size=16)
    return out


def bench_recipe(max_length: int, seed: int, embed: dict, gradients: dict, propagate: dict):
    """The :class:`SelectionRecipe` of a benchmark's parameters (config dicts as in ``profiles.py``)."""
    from idistill_core.pipeline.recipe import SelectionRecipe
    from idistill_core.steps.embed import EmbedConfig
    from idistill_core.steps.gradients import GradientConfig
    from idistill_core.steps.propagate import PropagateConfig

    return SelectionRecipe(
        max_length=max_length,
        seed=seed,
        embed=EmbedConfig(**embed),
        gradients=GradientConfig(**gradients),
        propagate=PropagateConfig(**propagate),
    )


def tokenized(path: Path, tokenizer, max_length: int, limit: int | None = None):
    """Tokenized examples (``datasets.Dataset``) of a jsonl file in our row schema."""
    from idistill_core.data.chat import tokenize_rows
    from idistill_core.data.rows import load_rows

    return tokenize_rows(load_rows(path, limit=limit), tokenizer, max_length).examples


# ---------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------
def _json_default(value: Any):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_result(
    results_dir: str | Path,
    name: str,
    profile: str,
    params: dict[str, Any],
    figures: dict[str, Any],
    rows: list[dict[str, Any]],
    notes: list[str],
    machine: dict[str, Any],
    seconds: float,
) -> Path:
    """Write ``<results_dir>/<name>.json`` atomically (a killed run never leaves half a file)."""
    out_dir = Path(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "profile": profile,
        "created_utc": utc_now(),
        # the commit the run started from when the caller recorded it (HEAD may move during a long run)
        "git_commit": machine.get("git_commit") or git_commit(),
        "seconds": round(seconds, 1),
        "machine": machine,
        "params": params,
        "figures": figures,
        "rows": rows,
        "notes": notes,
    }
    path = out_dir / f"{name}.json"
    write_json_atomic(path, record)
    return path


def write_json_atomic(path: str | Path, record: dict[str, Any]) -> None:
    """``record`` as indented JSON at ``path``, through a temporary file (a killed run never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def merge_scale_figures(results_dir: str | Path, figures: dict[str, Any]) -> Path:
    """Add ``figures`` to ``scale.json``'s (read-modify-write; every other key is kept); returns its path."""
    path = Path(results_dir) / "scale.json"
    record = json.loads(path.read_text()) if path.exists() else {"benchmark": "scale", "figures": {}}
    record.setdefault("figures", {}).update(figures)
    write_json_atomic(path, record)
    return path


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def print_table(title: str, rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Print (and return) a markdown table of ``rows``."""
    if not rows:
        text = f"\n{title}\n(no rows)\n"
        print(text)
        return text
    columns = list(columns or rows[0].keys())
    lines = [f"\n{title}\n", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


if __name__ == "__main__":
    _child_main(sys.argv[1:])
