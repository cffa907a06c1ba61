"""What the subset assets hand off: the export folder (``idistill_core.export``: the rows with their messages
and a dataset card carrying the provenance), the provenance read from the upstream artefacts and the Dagster
instance, and the metadata that shows the card in the UI.

``selected_subset`` and ``mixed_subset`` write the folder as ``export/`` inside their versioned folder, so each
materialization has its own (published with the folder's rename); ``finetuned_checkpoint`` and ``eval_scores``
carry its card id, so a score names the exact rows it came from.
"""

from __future__ import annotations

import math
from pathlib import Path

import dagster as dg

from idistill_assets.resources import IdistillResource
from idistill_assets.upstream import embedded_pool_path, load_landmarks, pool_path, propagation_path
from idistill_core import export
from idistill_core.store import artifacts

EXPORT = "export"
PREFIX = "idistill"


def latest_metadata(context, asset: str, partition: str | None, name: str):
    """A metadata value of the latest materialization of ``asset`` (in ``partition``), or None."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey([PREFIX, asset]), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    value = records[0].asset_materialization.metadata.get(name)
    value = getattr(value, "value", value)
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _lance(res: IdistillResource) -> dict:
    """The Lance tables (and versions) the selection read: the embeddings at the version the embeddings
    materialization recorded, the coefficients at the propagation's."""
    import pyarrow.parquet as pq

    lance = {}
    if embedded_pool_path(res).exists():
        meta = pq.read_schema(embedded_pool_path(res)).metadata or {}
        lance["embeddings"] = {
            "uri": str(res.settings.lancedb_uri),
            "table": meta.get(b"table", b"").decode(),
            "version": int(meta.get(b"lance_version", b"0")),
        }
    if propagation_path(res).exists():
        state = artifacts.read_json(propagation_path(res))
        lance["coefficients"] = {"uri": state["uri"], "table": state["table"], "version": state["version"]}
    return lance


def provenance(res: IdistillResource, pool_table, uses_landmarks: bool) -> tuple[dict, dict | None]:
    """The card fields every subset asset shares (pool, model, recipe, Lance tables) and the landmark ids."""
    from idistill_core.store.hashing import config_fingerprint

    s = res.settings
    loaded = res.load_model()
    fields = {
        "pool": {
            "id": s.pool.source,
            "path": str(pool_path(res)),
            "format": "chat",
            "rows": pool_table.num_rows,
            "content_hash": export.pool_hash(pool_table),
        },
        "model": {"id": s.model, "fingerprint": loaded.fingerprint,
                  **({"cache_dir": str(s.cache_dir)} if s.cache_dir else {})},
        "recipe": export.recipe_dict(s.recipe),
        "recipe_fingerprint": config_fingerprint(s.recipe),
        "lance": _lance(res) if uses_landmarks else None,
    }
    landmarks = None
    if uses_landmarks:
        landmark_ids, _, holdout_ids, _ = load_landmarks(res)
        landmarks = {"landmarks": list(landmark_ids), "holdout": list(holdout_ids)}
    return fields, landmarks


def write(folder: Path, subset, fields: dict, landmarks: dict | None, pool_counts: dict) -> export.ExportResult:
    """Write the export folder of a subset (a polars frame with the subset columns) as ``folder``/export."""
    rows = subset.to_arrow()
    fields = {**fields, "composition": export.composition(export.count_sources(rows), pool_counts)}
    return export.write_export(folder / EXPORT, rows, fields, landmarks)


def publish(
    res: IdistillResource, staging: Path, subset, fields: dict, landmarks: dict | None, pool_counts: dict,
    exportable: bool = True,
) -> tuple[str, Path, export.ExportResult | None]:
    """Write the export into ``staging``, commit the staging folder under the version of the subset files alone
    (the card's software fields never change the data version), and return ``(version, folder, export)``.

    A version folder committed before exports existed gets its export written in place (atomically). A subset
    its blocking check rejects (``exportable`` False: ids the pool lacks, ...) is committed without an export."""
    from idistill_core.store.hashing import file_hash, stable_hash

    files = sorted(p for p in staging.rglob("*") if p.is_file())
    version = stable_hash({str(p.relative_to(staging)): file_hash(p) for p in files}, 16)
    if exportable:
        write(staging, subset, fields, landmarks, pool_counts)
    version, folder = res.commit(staging, version)
    if not exportable:
        return version, folder, None
    if not (folder / EXPORT / export.CARD).exists():
        write(folder, subset, fields, landmarks, pool_counts)
    card = export.read_provenance(folder / EXPORT)  # what is on disk (an identical earlier version is kept)
    return version, folder, export.ExportResult(folder / EXPORT, card["subset"]["content_hash"], card["subset"]["rows"], card)


def card_metadata(result: export.ExportResult | None) -> dict:
    """Dagster metadata of an export: a link to the folder, the card id, the card's key fields as a table."""
    if result is None:
        return {"export": "none: the subset failed its check (see subset_valid)"}
    fields = export.key_fields(result.provenance)
    lines = ["| field | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in fields.items()]]
    return {
        "export": dg.MetadataValue.path(str(result.path)),
        "card_id": result.card_id,
        "card": dg.MetadataValue.md("\n".join(lines)),
    }


def card_id_of(folder: Path) -> str | None:
    """The card id of the export in a subset's versioned folder (None for a folder written before exports)."""
    try:
        return export.read_provenance(folder / EXPORT)["subset"]["content_hash"]
    except Exception:  # noqa: BLE001 - no export, or an unreadable card: shown as unknown, never fatal here
        return None
