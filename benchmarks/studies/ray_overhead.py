"""Ray's overhead on one machine: the same embeddings on the local backend and on a local Ray cluster.

    python -m benchmarks.studies.ray_overhead [--model smollm2-135m-instruct] [--pool 192] [--out benchmarks/results]

Embeds the first ``--pool`` samples of the built-in pool (default profile recipe: k=4 blocks, m=2 tangents,
D=1024, bfloat16, max length 192) into fresh LanceDB tables with ``pipeline.embed_pool``:

- local backend, torch with every core of this machine, and with one thread;
- ray backend on a local cluster (started once, not timed): 1 actor x 1 CPU, 1 actor x all CPUs, and one actor
  per CPU with 1 CPU each. Wall time includes actor start-up and model load (paid once per job) and the first
  result's latency is reported separately, so steady-state throughput can be read off too.

Writes ``ray_overhead.json``. The vectors of every Ray run are compared with the local ones (max |diff|).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import numpy as np

from benchmarks.common import builtin_data, machine_info, print_table, tokenized, write_result


def _run(loaded, examples, recipe, backend, source, work: str, name: str) -> dict:
    from idistill_core.pipeline.embeddings import embed_pool, open_store

    store = open_store(f"{work}/{name}", "emb", loaded.fingerprint, recipe, loaded.model.config.hidden_size)
    first: list[float] = []
    start = time.perf_counter()
    report = embed_pool(
        loaded.model,
        loaded.tokenizer,
        examples,
        store,
        recipe.embed,
        commit_every=8,
        on_commit=lambda done, total: first or first.append(time.perf_counter() - start),
        backend=backend,
        source=source,
    )
    seconds = time.perf_counter() - start
    ids = sorted(store.sample_ids())
    after = report.computed - 8  # rows committed after the first commit: steady state, start-up excluded
    return {
        "name": name,
        "steady_samples_per_s": after / (seconds - first[0]) if seconds > first[0] else None,
        "samples": report.computed,
        "seconds": seconds,
        "first_commit_s": first[0],
        "samples_per_s": report.computed / seconds,
        "_vectors": store.read(ids),
    }


def main(argv: list[str] | None = None) -> int:
    import ray
    import torch

    from idistill_core.backends import BackendConfig, ModelSource
    from idistill_core.models.loading import load_model
    from idistill_core.project.settings import load_settings

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pool", type=int, default=192)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    begin = time.perf_counter()
    cores = os.cpu_count() or 1
    machine = machine_info()
    recipe = load_settings("profiles/default.yaml").recipe
    loaded = load_model(args.model, attn_implementation="eager")
    source = ModelSource.of(loaded)
    with tempfile.TemporaryDirectory() as work:
        examples = tokenized(
            builtin_data(work, 200) / "pool.jsonl", loaded.tokenizer, recipe.max_length, args.pool
        )
        threads = torch.get_num_threads()
        rows = [_run(loaded, examples, recipe, None, None, work, f"local ({threads} threads)")]
        # one thread on each side too: on a shared, loaded machine multi-threaded runs suffer from oversubscription
        torch.set_num_threads(1)
        rows.append(_run(loaded, examples, recipe, None, None, work, "local (1 thread)"))
        torch.set_num_threads(threads)
        start = time.perf_counter()
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        cluster_start = time.perf_counter() - start
        try:
            for actors, cpus in [(1, 1), (1, cores), (cores, 1)]:
                backend = BackendConfig(
                    name="ray", num_actors=actors, cpus_per_actor=cpus, samples_per_task=8
                )
                rows.append(
                    _run(loaded, examples, recipe, backend, source, work, f"ray {actors} actor x {cpus} CPU")
                )
        finally:
            ray.shutdown()
    reference = rows[0]["_vectors"]
    for row in rows:
        diff = np.abs(row.pop("_vectors") - reference).max(axis=1) / np.abs(reference).max(axis=1)
        row["max_rel_diff_vs_local"] = float(diff.max())  # per row, relative to the row's largest entry
        row["throughput_vs_local"] = row["samples_per_s"] / rows[0]["samples_per_s"]
    by = {row["name"]: row for row in rows}
    one, many = by["ray 1 actor x 1 CPU"], by[f"ray {cores} actor x 1 CPU"]
    figures = {
        "local_samples_per_s": rows[0]["samples_per_s"],
        "ray_overhead_ratio_same_cpus": rows[0]["samples_per_s"]
        / by[f"ray 1 actor x {cores} CPU"]["samples_per_s"],
        f"ray_{cores}_actors_over_1_actor": many["samples_per_s"] / one["samples_per_s"],
        "ray_steady_overhead_ratio_same_cpus": rows[0]["steady_samples_per_s"]
        / by[f"ray 1 actor x {cores} CPU"]["steady_samples_per_s"],
        f"ray_steady_{cores}_actors_over_1_actor": many["steady_samples_per_s"] / one["steady_samples_per_s"],
        "ray_steady_overhead_ratio_1_thread": by["local (1 thread)"]["steady_samples_per_s"]
        / one["steady_samples_per_s"],
        "ray_cluster_start_s": cluster_start,
        "uptime_load_at_start": machine.get("load_average"),
        "load_average_at_end": list(os.getloadavg()),
    }
    print(print_table("Ray overhead (embeddings)", rows))
    params = {
        "model": args.model,
        "pool": args.pool,
        "embed": dataclasses.asdict(recipe.embed),
        "max_length": recipe.max_length,
        "samples_per_task": 8,
        "commit_every": 8,
    }
    notes = [
        "wall time of embed_pool: includes actor start-up + model load in each actor (once per job), not cluster start",
        "ray_overhead_ratio_same_cpus = local samples/s over ray (1 actor x all CPUs) samples/s; > 1 means Ray is slower",
        "shared machine: see load averages; one run each, no repeats",
    ]
    path = write_result(
        args.out,
        "ray_overhead",
        "default",
        params,
        figures,
        rows,
        notes,
        machine,
        time.perf_counter() - begin,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
