"""The hand-off: a selected subset as a Hugging Face dataset folder whose card carries its provenance, the check
that a stored folder still matches its card (``idistill verify``), and the upload to the Hub.

Layout of an export folder (docs/handoff.md)::

    README.md                          dataset card: the Hub's YAML header, key fields, the source table and the
                                       full provenance as a JSON block (what ``verify`` reads)
    data/train-00000-of-00001.parquet  the selected rows in rank order: sample_id, source, messages, score,
                                       weight, rank (+ target for a mix)
    landmarks.json                     landmark and held-out ids (method ``id``); the card holds their hash

One layout, the Hub's parquet one: ``datasets.load_dataset("parquet", data_dir=DIR)`` and
``load_dataset(DIR)`` (the card's ``configs``) both read it, and ``upload_folder`` publishes it unchanged. Not
also ``save_to_disk``'s Arrow layout: a second copy of the rows that could disagree with the first.

Re-exporting the same rows and provenance gives the same bytes: rows sorted by rank, parquet writer options
pinned, no timestamps in the card, sorted JSON. The content hash of the rows (the card id) is over their values,
not the parquet bytes, so ``verify`` recomputes it from what ``datasets`` reads.

Why a module of its own beside ``cli.py`` rather than in ``project/`` or ``store/``: ``project/`` reads what a
user wrote (profiles, target and mix YAMLs) and ``store/`` holds the low-level stores the steps import; the
hand-off sits on top of both, like the CLI (it reads pools through ``data``, fingerprints models through
``models`` and publishes through ``store.artifacts``), and the CLI and the Dagster assets both call it.

Why one module of ~600 lines: writing, verifying and pushing share the card format and the row and pool hashes;
split, the verifier would import the writer's private helpers (``_messages``, ``_digest``, ``_rows``) and the two
halves could drift apart on what a hash covers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pyarrow as pa

from idistill_core.errors import DataError, OutputError
from idistill_core.store import artifacts

FORMAT_VERSION = 1
CARD = "README.md"
DATA_FILE = "data/train-00000-of-00001.parquet"
LANDMARKS = "landmarks.json"
COLUMNS = ("sample_id", "source", "messages", "score", "weight", "rank")
PROVENANCE_MARK = "<!-- idistill provenance: read by `idistill verify`; do not edit -->"
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
TYPES = {
    "sample_id": pa.string(),
    "source": pa.string(),
    "messages": MESSAGE_TYPE,
    "score": pa.float64(),
    "weight": pa.float64(),
    "rank": pa.int64(),
    "target": pa.string(),
}
# Pinned so the same rows give the same bytes (pyarrow's own version is in the file's created_by).
PARQUET_OPTIONS = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": True,
    "write_statistics": True,
    "version": "2.6",
    "data_page_version": "1.0",
    "row_group_size": 65536,
}


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What :func:`write_export` published."""

    path: Path
    card_id: str
    """Content hash of the rows (16 hex chars): the subset's id in the card and in Dagster."""
    rows: int
    provenance: dict


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of ``idistill verify``: ``status`` is ``ok``, ``mismatch`` or ``skipped``."""

    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status.upper():<8} {self.name}: {self.detail}"


# ---------------------------------------------------------------------------------------------------------
# rows and hashes


def _messages(value) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in value or []]


def subset_table(rows: pa.Table) -> pa.Table:
    """The export's columns (``COLUMNS`` plus ``target`` when present), typed, in rank order.

    Raises:
        DataError: a column is missing or a row has no messages (an id the pool lacks).
    """
    missing = [c for c in COLUMNS if c not in rows.column_names]
    if missing:
        raise DataError(f"export: the subset rows lack column(s) {missing}; have {rows.column_names}")
    names = [*COLUMNS, *(["target"] if "target" in rows.column_names else [])]
    data = rows.select(names).to_pylist()
    lost = [r["sample_id"] for r in data if not r["messages"]]
    if lost:
        raise DataError(f"export: {len(lost)} selected ids have no messages in the pool (first: {lost[0]!r})")
    for row in data:
        row["messages"] = _messages(row["messages"])
    data.sort(key=lambda r: r["rank"])
    return pa.Table.from_pylist(data, schema=pa.schema([(n, TYPES[n]) for n in names]))


def _digest(lines: Iterable[dict]) -> str:
    digest = hashlib.sha256()
    for row in lines:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def _rows(table: pa.Table, batch: int = 4096) -> Iterable[dict]:
    for chunk in table.to_batches(max_chunksize=batch):
        yield from chunk.to_pylist()


def rows_hash(table: pa.Table) -> str:
    """Content hash of export rows, in their order (floats by their exact repr, messages as role/content)."""
    names = [c for c in (*COLUMNS, "target") if c in table.column_names]
    return _digest({**{c: r[c] for c in names}, "messages": _messages(r["messages"])} for r in _rows(table))


def _pool_rows(table: pa.Table) -> dict[str, dict]:
    keyed = {}
    for row in _rows(table.select(["sample_id", "source", "messages"])):
        keyed[row["sample_id"]] = {**row, "messages": _messages(row["messages"])}
    return keyed


def pool_hash(table: pa.Table | dict) -> str:
    """Content hash of pool rows (sample_id, source, messages), independent of row order and file format."""
    keyed = table if isinstance(table, dict) else _pool_rows(table)
    return _digest(keyed[s] for s in sorted(keyed))


def ids_digest(ids: Mapping[str, Sequence[str]]) -> str:
    """Hash of named id lists in their order (landmarks, held-out)."""
    return _digest([{k: list(v) for k, v in sorted(ids.items())}])


def as_arrow(rows) -> pa.Table:
    """A pyarrow Table from a ``datasets.Dataset``, a polars frame or a Table."""
    if isinstance(rows, pa.Table):
        return rows
    if hasattr(rows, "with_format") and hasattr(rows, "features"):  # datasets.Dataset (respects its indices)
        return rows.with_format("arrow")[:]
    return rows.to_arrow()


# ---------------------------------------------------------------------------------------------------------
# provenance


@functools.lru_cache(maxsize=1)
def software() -> dict:
    """idistill's version and the git commit of this checkout (None outside one); read once per process."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("idistill")
    except importlib.metadata.PackageNotFoundError:
        version = None
    root = Path(__file__).resolve().parents[1]
    commit = None
    if (root / ".git").exists():
        try:
            done = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=10
            )
            commit = done.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"idistill": version, "git_commit": commit}


def composition(selected: Mapping[str, int], pool: Mapping[str, int]) -> dict:
    """``{source: {"selected": n, "pool": m}}`` for every source of the pool (and any only in the subset)."""
    names = sorted(set(pool) | set(selected), key=lambda s: (-selected.get(s, 0), s))
    return {s: {"selected": int(selected.get(s, 0)), "pool": int(pool.get(s, 0))} for s in names}


def count_sources(table: pa.Table) -> dict[str, int]:
    import pyarrow.compute as pc

    counts = pc.value_counts(table.column("source")).to_pylist()
    return {c["values"] or "": int(c["counts"]) for c in counts}


def lance_lineage(uri: str | Path, embeddings_table: str, num_landmarks: int | None) -> dict:
    """What a selection's LanceDB folder says about it: ``{"lance": {"embeddings": {...}, "coefficients":
    {...}}, "landmarks": {"landmarks": ids}}``, the embeddings table's current version and the coefficient table
    built for ``num_landmarks`` landmarks (with its landmark ids). When the folder holds several coefficient
    tables of that size (a reused ``--store``), which one this run used is not known here: it is left out."""
    import lancedb

    db = lancedb.connect(str(uri))
    names = db.list_tables().tables
    lance: dict = {}
    if embeddings_table in names:
        version = int(db.open_table(embeddings_table).version)
        lance["embeddings"] = {"uri": str(uri), "table": embeddings_table, "version": version}
    matches = []
    for name in names:
        if num_landmarks and name.startswith("coefficients_"):
            dataset = db.open_table(name).to_lance()
            ids = json.loads(dataset.schema.metadata[b"idistill"])["landmark_ids"]
            if len(ids) == num_landmarks:
                matches.append((name, int(dataset.version), list(ids)))
    landmarks = None
    if len(matches) == 1:
        name, version, ids = matches[0]
        lance["coefficients"] = {"uri": str(uri), "table": name, "version": version}
        landmarks = {"landmarks": ids}
    return {"lance": lance or None, "landmarks": landmarks}


def recipe_dict(recipe) -> dict:
    """A recipe dataclass as plain JSON-able data (the card's full recipe)."""
    return json.loads(json.dumps(dataclasses.asdict(recipe), sort_keys=True, default=str))


# ---------------------------------------------------------------------------------------------------------
# the card


def _size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return label
    return "1M<n<10M" if n < 10_000_000 else "n>10M"


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _lance(table: Mapping | None) -> str:
    return f"{table['table']} v{table['version']}" if table and table.get("table") else "—"


def key_fields(provenance: Mapping) -> dict[str, str]:
    """The fields a person reads first (the card's table and the Dagster metadata), rounded for people."""
    lance = provenance.get("lance") or {}
    landmarks = provenance.get("landmarks") or {}
    method = provenance.get("method") or {}
    return {
        "card id (rows' content hash)": provenance["subset"]["content_hash"],
        "rows": str(provenance["subset"]["rows"]),
        "budget": _fmt(provenance.get("budget")),
        "method": " ".join(f"{k}={v}" for k, v in method.items()) or "—",
        "pool": f"{provenance['pool'].get('id')} ({provenance['pool'].get('rows')} rows, "
        f"hash {provenance['pool'].get('content_hash')})",
        "model": f"{provenance['model'].get('id')} (fingerprint {provenance['model'].get('fingerprint')})",
        "fidelity ρ (held-out)": _fmt(provenance.get("fidelity_spearman")),
        "landmarks": f"{landmarks['count']} (+{landmarks['holdout']} held out), ids hash {landmarks['ids_hash']}"
        if landmarks else "—",
        "embeddings (Lance)": _lance(lance.get("embeddings")),
        "coefficients (Lance)": _lance(lance.get("coefficients")),
        "recipe fingerprint": _fmt(provenance.get("recipe_fingerprint")),
        "idistill": f"{provenance['software'].get('idistill')} (commit {provenance['software'].get('git_commit')})",
    }


def render_card(provenance: Mapping) -> str:
    """The dataset card: the Hub's YAML header, a how-to-load line, key fields, sources, provenance JSON."""
    import yaml

    name = provenance.get("name") or "subset"
    header = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
        "task_categories": ["text-generation"],
        "tags": ["idistill", "influence-distillation", "data-selection", "sft"],
        "size_categories": [_size_category(provenance["subset"]["rows"])],
        "pretty_name": f"idistill subset: {name}",
    }
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [
        f"# idistill subset: {name}",
        "",
        (
            f"{provenance['subset']['rows']} rows chosen by [idistill](https://arxiv.org/abs/2505.19051) for the "
            f"model `{provenance['model'].get('id')}`, in rank order, in the chat `messages` format that TRL's "
            "`SFTTrainer` trains on as-is. The pool's license applies to the rows (idistill does not know it)."
        ),
        "",
        "```python",
        "from datasets import load_dataset",
        'rows = load_dataset("parquet", data_dir="path/to/this/folder", split="train")  # or load_dataset(REPO)',
        "```",
        "",
        "Columns: `sample_id` (pool id), `source` (pool source), `messages` (role/content turns), `score` "
        "(influence on the target, higher helps more), `weight` (training weight), `rank` (0 = most influential)"
        + (", `target` (the target that picked the row)." if provenance["subset"].get("has_target") else "."),
        "",
        "## Key fields",
        "",
        "| field | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in key_fields(provenance).items()],
        "",
        "## Source composition",
        "",
        "| source | selected | pool | share of subset |",
        "|---|---:|---:|---:|",
    ]
    total = max(1, provenance["subset"]["rows"])
    for source, c in (provenance.get("composition") or {}).items():
        lines.append(f"| {source} | {c['selected']} | {c['pool']} | {c['selected'] / total:.1%} |")
    lines += [
        "",
        "## Provenance",
        "",
        (
            "`idistill verify <this folder>` recomputes the rows' content hash, the pool's (when the pool file "
            "below is reachable) and the model's fingerprint (when it loads offline) and says whether they match."
        ),
        "",
        PROVENANCE_MARK,
        "```json",
        json.dumps(provenance, indent=2, sort_keys=True, ensure_ascii=False, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def read_provenance(folder: str | Path) -> dict:
    """The provenance JSON of an export folder's card.

    Raises:
        DataError: not a folder, no card, or a card without idistill's provenance block.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (expected an idistill export folder with {CARD} and data/)")
    card = folder / CARD
    if not card.is_file():
        raise DataError(f"{folder}: no {CARD}; not an idistill export folder")
    text = card.read_text(encoding="utf-8", errors="replace")
    start = text.find(PROVENANCE_MARK)
    if start < 0:
        raise DataError(f"{card}: no idistill provenance block (the line {PROVENANCE_MARK!r})")
    block = text[start + len(PROVENANCE_MARK):]
    try:
        body = block.split("```json", 1)[1].split("```", 1)[0]
        provenance = json.loads(body)
    except (IndexError, json.JSONDecodeError) as err:
        raise DataError(f"{card}: the provenance block is not valid JSON ({err})") from None
    if provenance.get("format") != FORMAT_VERSION:
        raise DataError(f"{card}: export format {provenance.get('format')!r}, this idistill reads {FORMAT_VERSION}")
    return provenance


# ---------------------------------------------------------------------------------------------------------
# writing


def _is_export(folder: Path) -> bool:
    card = folder / CARD
    return card.is_file() and PROVENANCE_MARK in card.read_text(encoding="utf-8", errors="replace")


def check_export_folder(folder: str | Path, what: str = "--export") -> None:
    """``folder`` may receive an export: absent, empty, or an earlier export (replaced whole); checked before work.

    Raises:
        OutputError: a file, a folder with other content, or not writable.
    """
    from idistill_core.project import validate

    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not _is_export(folder):
        raise OutputError(f"{what} {folder} holds files that are not an idistill export; name a new or empty folder")
    validate.check_output_folder(folder.parent if not folder.exists() else folder, what)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what} {folder} is a file, not a folder")


def write_parquet(table: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, str(path), **PARQUET_OPTIONS)


def write_export(
    out_dir: str | Path,
    rows,
    provenance: Mapping,
    landmarks: Mapping[str, Sequence[str]] | None = None,
) -> ExportResult:
    """Write the subset folder (rows, card, landmark ids) and publish it in one rename.

    Args:
        out_dir: the folder to (re)place.
        rows: the selected rows with ``COLUMNS`` (and optionally ``target``): a pyarrow Table, a polars frame
            or a ``datasets.Dataset``; any order (written by rank).
        provenance: the card's fields (pool, model, method, recipe, lance, fidelity_spearman, budget,
            composition, name, ...); ``subset``, ``landmarks``, ``software`` and ``format`` are filled in here.
        landmarks: ``{"landmarks": ids, "holdout": ids}`` for method ``id`` (written to ``landmarks.json``).

    Returns:
        ``ExportResult`` with the card id (the rows' content hash).
    """
    table = subset_table(as_arrow(rows))
    card_id = rows_hash(table)
    full = {
        **provenance,
        "format": FORMAT_VERSION,
        "subset": {
            "content_hash": card_id,
            "rows": table.num_rows,
            "file": DATA_FILE,
            "columns": table.column_names,
            "has_target": "target" in table.column_names,
        },
        "software": provenance.get("software") or software(),
    }
    if landmarks:
        full["landmarks"] = {
            "count": len(landmarks.get("landmarks", [])),
            "holdout": len(landmarks.get("holdout", [])),
            "ids_hash": ids_digest(landmarks),
            "file": LANDMARKS,
        }
    full = json.loads(json.dumps(full, sort_keys=True, default=str))  # plain JSON values, as verify reads them
    with artifacts.atomic_path(out_dir, is_dir=True) as tmp:
        (tmp / "data").mkdir()
        write_parquet(table, tmp / DATA_FILE)
        if landmarks:
            text = json.dumps({k: list(v) for k, v in landmarks.items()}, indent=1, sort_keys=True)
            (tmp / LANDMARKS).write_text(text + "\n", encoding="utf-8")
        (tmp / CARD).write_text(render_card(full), encoding="utf-8")
        for path in (tmp, tmp / "data"):
            path.chmod(0o755)  # mkdtemp makes 0700; an export is meant to be read by others
    return ExportResult(Path(out_dir), card_id, table.num_rows, full)


# ---------------------------------------------------------------------------------------------------------
# verify


def _read_rows(folder: Path) -> pa.Table:
    import pyarrow.parquet as pq

    path = folder / DATA_FILE
    if not path.is_file():
        raise DataError(f"{folder}: no {DATA_FILE}; not an idistill export folder")
    try:
        return pq.read_table(str(path))
    except Exception as err:  # noqa: BLE001 - pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({err})") from None


def _check_rows(folder: Path, provenance: dict) -> list[Check]:
    table = _read_rows(folder)
    want = provenance["subset"]
    got = rows_hash(table)
    checks = []
    if got == want["content_hash"] and table.num_rows == want["rows"]:
        checks.append(Check("rows", "ok", f"{table.num_rows} rows, content hash {got} as in the card"))
    else:
        checks.append(Check("rows", "mismatch", f"{table.num_rows} rows with content hash {got}; the card says "
                            f"{want['rows']} rows, {want['content_hash']}"))
    extra = sorted(str(p.relative_to(folder)) for p in (folder / "data").rglob("*") if p.is_file())
    if extra != [DATA_FILE]:
        checks.append(Check("data files", "mismatch", f"data/ holds {extra}; the card names only {DATA_FILE}"))
    return checks


def _check_landmarks(folder: Path, provenance: dict) -> list[Check]:
    want = provenance.get("landmarks")
    if not want:
        return []
    path = folder / want.get("file", LANDMARKS)
    try:
        got = ids_digest(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        return [Check("landmarks", "mismatch", f"{path.name} unreadable ({err})")]
    if got == want["ids_hash"]:
        return [Check("landmarks", "ok", f"{want['count']} landmark ids, hash {got} as in the card")]
    return [Check("landmarks", "mismatch", f"{path.name} hashes to {got}; the card says {want['ids_hash']}")]


def _check_pool(folder: Path, provenance: dict, pool: str | None) -> list[Check]:
    from idistill_core.data.rows import load_rows

    info = provenance.get("pool") or {}
    path = pool or info.get("path")
    if not path or not Path(path).exists():
        return [Check("pool", "skipped", f"pool file {path!r} is not reachable here (pass --pool FILE)")]
    keyed = _pool_rows(as_arrow(load_rows(str(path), fmt=info.get("format") or "auto", format_option="pool format")))
    got = pool_hash(keyed)
    checks = [
        Check("pool", "ok", f"{path}: {len(keyed)} rows, content hash {got} as in the card")
        if got == info.get("content_hash")
        else Check("pool", "mismatch", f"{path}: content hash {got}; the card says {info.get('content_hash')}")
    ]
    rows = _read_rows(folder).select(["sample_id", "source", "messages"]).to_pylist()
    missing = [r["sample_id"] for r in rows if r["sample_id"] not in keyed]
    differ = [
        r["sample_id"] for r in rows if r["sample_id"] in keyed
        and (keyed[r["sample_id"]]["source"], keyed[r["sample_id"]]["messages"]) != (r["source"], _messages(r["messages"]))
    ]
    if missing or differ:
        first = (missing or differ)[0]
        checks.append(Check("rows in pool", "mismatch", f"{len(missing)} ids not in the pool, {len(differ)} rows "
                            f"whose source or messages differ from the pool's (first: {first!r})"))
    else:
        checks.append(Check("rows in pool", "ok", f"all {len(rows)} rows are the pool's rows, unchanged"))
    return checks


def offline_loadable(spec: str, cache_dir: str | None = None) -> bool:
    """Whether ``load_model(spec)`` can run without the network: a built-in tiny model, a local folder or GGUF
    file, or the default model already converted in the cache."""
    from idistill_core.models.loading import DEFAULT_MODEL, TINY_SPECS, default_cache_dir

    if spec in TINY_SPECS:
        return True
    if spec == DEFAULT_MODEL:
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        return (cache / DEFAULT_MODEL / "config.json").is_file()
    path = Path(spec).expanduser()
    return (path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and path.suffix == ".gguf")


def _check_model(provenance: dict, model: str | None) -> list[Check]:
    info = provenance.get("model") or {}
    spec = model or info.get("id")
    cache = info.get("cache_dir")
    if not spec or not offline_loadable(spec, cache):
        return [Check("model", "skipped", f"{spec!r} does not load offline here (pass --model DIR with a local copy)")]
    from idistill_core.models.loading import load_model

    got = load_model(spec, cache_dir=cache).fingerprint
    if got == info.get("fingerprint"):
        return [Check("model", "ok", f"{spec}: fingerprint {got} as in the card")]
    return [Check("model", "mismatch", f"{spec}: fingerprint {got}; the card says {info.get('fingerprint')}")]


def verify(folder: str | Path, pool: str | None = None, model: str | None = None) -> list[Check]:
    """Recompute what can be recomputed here and compare it with the card, one :class:`Check` each.

    Raises:
        DataError: ``folder`` is not an export folder (no card, no provenance, no data file).
    """
    folder = Path(folder)
    provenance = read_provenance(folder)
    return [
        *_check_rows(folder, provenance),
        *_check_landmarks(folder, provenance),
        *_check_pool(folder, provenance, pool),
        *_check_model(provenance, model),
    ]


# ---------------------------------------------------------------------------------------------------------
# the Hub


def hub_operations(folder: str | Path) -> list:
    """One ``CommitOperationAdd`` per file of the export folder, in path order."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]


def push_to_hub(folder: str | Path, repo_id: str, private: bool | None = None, token: str | None = None) -> str:
    """Create the dataset repo ``repo_id`` if needed and commit every file of the export folder in one commit
    (``HfApi.create_commit``, huggingface_hub's upload call). Returns the commit URL.

    Needs the network and a token (``HF_TOKEN`` or ``huggingface-cli login``); the tests stop at the request.
    """
    from huggingface_hub import HfApi

    provenance = read_provenance(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private)
    info = api.create_commit(
        repo_id=repo_id,
        repo_type="dataset",
        operations=hub_operations(folder),
        commit_message=f"idistill subset {provenance['subset']['content_hash']}",
    )
    return str(getattr(info, "commit_url", info))
