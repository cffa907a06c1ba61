"""Pool and target loading: local jsonl/json/parquet files or hub datasets, validated row by row.

Every loader returns a disk-backed ``datasets.Dataset`` in the project's row schema; every row is read and
checked before anything is written, and a bad one is named by file and line. The schema and conversions are :mod:`idistill_core.data.formats`; tokenisation is :mod:`idistill_core.data.chat`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import datasets

from idistill_core.data.formats import (
    _CONVERTERS,
    _SCHEMA_COLUMNS,
    FEATURES,
    FORMATS,
    METRIC_COLUMNS,
    _finish,
    _where,
    ambiguity,
    detect_format,
)
from idistill_core.errors import DataError

logger = logging.getLogger("idistill")


_HUB_DEFAULTS = {
    "openai/gsm8k": ("main", "test"),
    "cais/mmlu": ("all", "test"),
    "rajpurkar/squad": (None, "validation"),
    "allenai/tulu-v2-sft-mixture": (None, "train"),
}

_HUB_FORMATS = {
    "openai/gsm8k": "gsm8k",
    "cais/mmlu": "mmlu",
    "rajpurkar/squad": "squad",
    "allenai/tulu-v2-sft-mixture": "tulu",
}


def _not_utf8(path: Path, where: str, err: UnicodeDecodeError, offset: int) -> DataError:
    byte = err.object[err.start]
    return DataError(
        f"{where}: byte 0x{byte:02x} at file offset {offset} is not valid UTF-8; re-save {path.name} as UTF-8 "
        f"(e.g. iconv -f latin1 -t utf-8 {path.name})"
    )


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    offset = 0
    with open(path, "rb") as handle:
        for number, data in enumerate(handle, start=1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as err:
                where = f"{path}:{number}:{err.start + 1}"  # line:column, the column counted in bytes
                raise _not_utf8(path, where, err, offset + err.start) from None
            offset += len(data)
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: malformed JSON line ({err.msg})") from None
            if not isinstance(raw, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(raw).__name__}")
            yield number, raw


def _iter_json(path: Path) -> Iterator[tuple[int, dict]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise _not_utf8(path, f"{path}:{line}:{column}", err, err.start) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
    for number, raw in enumerate(data, start=1):
        if not isinstance(raw, dict):
            raise DataError(f"{path}: row {number} is not a JSON object")
        yield number, raw


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({err})") from None


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as error:  # a damaged page: pyarrow reads it only when its batch comes
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(
                f"{path}: not a readable parquet file after row {number} ({reason[:200]}); re-export it"
            ) from None
        if batch is None:
            return
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:
            raise _parquet_not_utf8(path, batch, number) from None
        for raw in rows:
            number += 1
            yield number, raw


def _parquet_not_utf8(path: Path, batch, before: int) -> DataError:
    """Name the row and column of the first string that is not UTF-8 (parquet does not validate them)."""
    for i in range(batch.num_rows):
        for name in batch.schema.names:
            try:
                batch.column(name).slice(i, 1).to_pylist()
            except UnicodeDecodeError as err:
                return DataError(
                    f"{path} row {before + i + 1} column {name!r}: byte 0x{err.object[err.start]:02x} at "
                    f"offset {err.start} of the value is not valid UTF-8; re-encode that column as UTF-8"
                )
    return DataError(f"{path}: rows {before + 1}-{before + batch.num_rows} hold text that is not valid UTF-8")


def _string(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _messages_type(t) -> bool:
    import pyarrow as pa

    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    fields = {f.name: f.type for f in t.value_type}
    return all(name in fields and _string(fields[name]) for name in ("role", "content"))


_PARQUET_TYPES = {
    "chat": {"sample_id": (_string, "string"), "source": (_string, "string"),
             "messages": (_messages_type, "list<struct<role: string, content: string>>")},
    "tulu": {"id": (_string, "string"), "dataset": (_string, "string"),
             "messages": (_messages_type, "list<struct<role: string, content: string>>")},
    "gsm8k": {"question": (_string, "string"), "answer": (_string, "string")},
    "squad": {"id": (_string, "string"), "context": (_string, "string"), "question": (_string, "string")},
    "mmlu": {"question": (_string, "string")},
}


def _check_parquet_types(path: Path, fmt: str) -> None:
    import pyarrow.parquet as pq

    schema = pq.ParquetFile(path).schema_arrow
    for name, (ok, expected) in _PARQUET_TYPES[fmt].items():
        if name not in schema.names:
            continue
        found = schema.field(name).type
        if ok(found):
            continue
        hint = "cast the column"
        if name == "messages" and _string(found):
            hint = "it holds JSON text: decode it (json.loads) into a list of {role, content} structs"
        raise DataError(
            f"{path}: parquet column {name!r} has type {found}; fmt={fmt!r} needs {expected} ({hint})"
        )


def _first_columns(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_columns(path)
    for _, raw in _iter_jsonl(path) if suffix == ".jsonl" else _iter_json(path):
        return list(raw)
    raise DataError(f"{path}: empty dataset (no rows)")


def _generate_rows(
    path: str, fmt: str, limit: int | None, default_source: str, stamp: str, detected: str | None = None
) -> Iterator[dict]:
    """Generator behind ``Dataset.from_generator``; ``stamp`` (size, mtime) only busts the datasets cache.

    ``detected``: the option name when ``fmt`` was auto-detected from the first row; every later row is then
    checked for the same ambiguity (a jsonl row may carry other fields than the first).
    """
    file = Path(path)
    suffix = file.suffix.lower()
    reader = {".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet}[suffix]
    convert = _CONVERTERS[fmt]
    seen: dict[str, int] = {}
    count = 0
    for number, raw in reader(file):
        if limit is not None and count >= limit:
            break
        where = _where(str(file), number)
        if detected is not None:
            reason = ambiguity(raw, where, detected)
            if reason is not None:
                raise DataError(reason)
        try:
            row = _finish(convert(raw, default_source), where)
        except DataError as err:
            message = str(err)
            raise DataError(message if message.startswith(str(file)) else f"{where}: {message}") from None
        except (KeyError, TypeError) as err:
            raise DataError(f"{where}: {fmt} row is missing or has a malformed field ({err})") from None
        previous = seen.get(row["sample_id"])
        if previous is not None:
            unit = "lines" if suffix == ".jsonl" else "rows"
            raise DataError(
                f"{file}: sample_id {row['sample_id']!r} appears twice ({unit} {previous} and {number}); "
                "ids must be unique"
            )
        seen[row["sample_id"]] = number
        count += 1
        yield row
    if count == 0:
        raise DataError(f"{file}: empty dataset (no rows)")


def _convert_hub_row(raw: dict, index: int, fmt: str, origin: str, default_source: str) -> dict:
    return _finish(_CONVERTERS[fmt](raw, default_source), f"{origin} row {index + 1}")


def _check_unique_ids(ds: datasets.Dataset, origin: str) -> None:
    seen: dict[str, int] = {}
    for number, sample_id in enumerate(ds["sample_id"], start=1):
        if sample_id in seen:
            raise DataError(
                f"{origin}: sample_id {sample_id!r} appears twice (rows {seen[sample_id]} and {number}); "
                "ids must be unique"
            )
        seen[sample_id] = number


def _unwrap(err: Exception) -> Exception:
    """``datasets`` wraps generator exceptions in DatasetGenerationError; surface our DataError instead."""
    cause = err
    while cause is not None:
        if isinstance(cause, DataError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return err


def _drop_empty_metric_columns(ds: datasets.Dataset) -> datasets.Dataset:
    table = ds.data
    empty = [c for c in METRIC_COLUMNS if c in ds.column_names and table.column(c).null_count == len(ds)]
    return ds.remove_columns(empty) if empty else ds


def _resolve_local(path: Path, split: str | None) -> Path:
    if path.is_dir():
        name = split or "train"
        for suffix in (".jsonl", ".parquet", ".json"):
            candidate = path / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
        raise DataError(f"{path}: no {name}.jsonl, {name}.parquet or {name}.json in this directory")
    return path


def load_rows(
    source: str | Path,
    fmt: str = "auto",
    split: str | None = None,
    limit: int | None = None,
    *,
    cache_dir: str | Path | None = None,
    format_option: str = "fmt",
) -> datasets.Dataset:
    """Load pool or target rows in our schema from a local file (or directory) or a hub dataset.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet`` file; a directory holding ``<split>.jsonl`` (or
            ``.parquet``/``.json``); or a hub name such as ``openai/gsm8k`` (optionally ``name:config``),
            loaded with ``datasets.load_dataset`` (needs network).
        fmt: one of ``auto|chat|tulu|gsm8k|squad|mmlu``; ``auto`` detects the schema from the columns.
        split: the split for hub datasets and directories (defaults: the hub dataset's usual eval split,
            ``train`` for directories); ignored for a single file.
        limit: keep only the first ``limit`` rows.
        cache_dir: where ``datasets`` keeps the Arrow files (default: its own cache,
            ``$HF_DATASETS_CACHE``).
        format_option: how the caller spells ``fmt`` (``--pool-format``, ``pool.format``), for messages.

    Returns:
        A disk-backed Dataset with columns ``sample_id, source, messages`` plus the metric columns
        (``answer``, ``choices``, ``answers``) that at least one row carries.

    Raises:
        DataError: missing file, malformed JSON (with line number), a parquet file missing a schema column,
            a byte that is not UTF-8 (line, column and file offset), a parquet column of the wrong type,
            missing/empty messages (or messages stored as a JSON string), an unknown role, no assistant turn, an
            empty assistant message, a non-string ``sample_id``, a duplicate ``sample_id`` (both row numbers),
            columns that fit two schemas with ``fmt="auto"``, or an empty dataset.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown fmt {fmt!r}; expected one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise DataError(f"load_rows limit must be >= 1; got {limit}")
    path = Path(source)
    text = str(source)
    is_hub = (
        not path.exists()
        and path.suffix.lower() not in (".jsonl", ".json", ".parquet")
        and re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", text) is not None
        and not text.startswith((".", "/"))
    )
    try:
        if is_hub:
            ds = _load_hub(text, fmt, split, limit, cache_dir, format_option)
        else:
            ds = _load_local(path, fmt, split, limit, cache_dir, format_option)
    except datasets.exceptions.DatasetGenerationError as err:
        raise _unwrap(err) from None
    return _drop_empty_metric_columns(ds)


def _load_local(
    path: Path, fmt: str, split: str | None, limit: int | None, cache_dir, option: str = "fmt"
) -> datasets.Dataset:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    path = _resolve_local(path, split)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected .jsonl, .json or .parquet")
    detected = None
    if fmt == "auto":
        fmt, detected = detect_format(_first_columns(path), str(path), option), option
    if suffix == ".parquet":
        columns = set(_parquet_columns(path))
        missing = [c for c in _SCHEMA_COLUMNS[fmt] if c not in columns]
        if missing:
            raise DataError(f"{path}: parquet schema has no column {missing[0]!r} needed by fmt={fmt!r}")
        _check_parquet_types(path, fmt)
    stat = path.stat()
    default_source = path.stem if path.stem not in ("train", "dev", "test") else path.parent.name
    logger.info("loading %s rows from %s", fmt, path)
    return datasets.Dataset.from_generator(
        _generate_rows,
        features=FEATURES,
        cache_dir=None if cache_dir is None else str(cache_dir),
        gen_kwargs={
            "path": str(path.resolve()),
            "fmt": fmt,
            "limit": limit,
            "default_source": default_source,
            "stamp": f"{stat.st_size}-{stat.st_mtime_ns}",
            "detected": detected,
        },
    )


def _load_hub(
    text: str, fmt: str, split: str | None, limit: int | None, cache_dir, option: str = "fmt"
) -> datasets.Dataset:
    name, _, config = text.partition(":")
    default_config, default_split = _HUB_DEFAULTS.get(name, (None, "train"))
    split = split or default_split
    origin = f"{name}[{split}]"
    logger.info("loading %s from the hub", origin)
    try:
        extra = {} if cache_dir is None else {"cache_dir": str(cache_dir)}
        raw_ds = datasets.load_dataset(name, config or default_config, split=split, **extra)
    except Exception as err:  # noqa: BLE001 - network, auth, bad name or split: all mean "cannot use it"
        first = (str(err).strip().splitlines() or [""])[0]
        raise DataError(
            f"{name}: not a local file and not loadable from the hub ({type(err).__name__}: {first})"
        ) from None
    if fmt == "auto":
        fmt = _HUB_FORMATS.get(name) or detect_format(raw_ds.column_names, name, option)
    if limit is not None:
        raw_ds = raw_ds.select(range(min(limit, len(raw_ds))))
    if len(raw_ds) == 0:
        raise DataError(f"{origin}: empty dataset (no rows)")
    # map (not a generator) so the Arrow cache is keyed by the hub dataset's own fingerprint.
    ds = raw_ds.map(
        _convert_hub_row,
        with_indices=True,
        fn_kwargs={"fmt": fmt, "origin": origin, "default_source": name.split("/")[-1]},
        remove_columns=raw_ds.column_names,
        features=FEATURES,
        desc=f"convert {fmt}",
    )
    _check_unique_ids(ds, origin)
    return ds
