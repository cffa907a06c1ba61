"""The assets' hand-off on the tiny project: ``selected_subset`` and ``mixed_subset`` each publish a loadable
Hugging Face dataset folder (``export/`` in their versioned folder) whose card ``idistill verify`` accepts; the
materialization links to it and shows the card's key fields; a re-materialization leaves the same bytes; the
eval scores name the card id of the subset the tuned model trained on."""

import hashlib
from pathlib import Path

import polars as pl
import yaml

from idistill_assets.definitions import build_definitions
from idistill_assets.resources import IdistillResource
from idistill_core import export

from .conftest import write_target
from .test_pipeline import key, run_shared, run_target


def _metadata(instance, asset: str) -> dict:
    event = instance.get_latest_materialization_event(key(asset))
    return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}


def _bytes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def _checks(folder: Path) -> dict[str, str]:
    return {c.name: c.status for c in export.verify(folder)}


def test_subset_assets_publish_a_loadable_verified_export_and_the_eval_names_its_card(project, instance):
    import datasets

    profile, targets_dir = project
    write_target(targets_dir, "reading")
    mixes = targets_dir / "mixes"
    mixes.mkdir()
    (mixes / "both.yaml").write_text(yaml.safe_dump({"name": "both", "targets": {"arith": 2, "reading": 1}, "budget": 9}))
    defs = build_definitions(str(profile))
    run_shared(defs, instance)
    run_target(defs, instance, "arith")  # the whole chain: subset, both checkpoints, eval
    res = IdistillResource(profile=str(profile))

    meta = _metadata(instance, "selected_subset")
    folder = Path(meta["export"])
    assert folder == res.current("selected_subset", "arith") / "export"
    rows = datasets.load_dataset("parquet", data_dir=str(folder), split="train")
    subset = pl.read_parquet(res.current("selected_subset", "arith") / "subset.parquet")
    assert rows.num_rows == 12 and rows["sample_id"] == subset["sample_id"].to_list()
    assert rows.column_names == list(export.COLUMNS)
    card = export.read_provenance(folder)
    assert meta["card_id"] == card["subset"]["content_hash"] == export.rows_hash(rows.with_format("arrow")[:])
    assert f"| card id (rows' content hash) | {meta['card_id']} |" in meta["card"]
    assert card["kind"] == "target" and card["name"] == "arith" and card["budget"] == 12
    assert card["pool"]["path"] == str(res.current("pool") / "pool.parquet")
    assert card["model"]["id"] == "tiny-llama" and card["landmarks"]["count"] == 24
    assert card["lance"]["coefficients"]["version"] >= 1 and card["lance"]["embeddings"]["version"] >= 1
    weights_meta = _metadata(instance, "propagated_weights")
    assert card["fidelity_spearman"] == weights_meta["fidelity_spearman"]
    assert all(float(f"{r['score']:.4g}") == r["score"] for r in meta["top_samples"].records[:3] for r in [r.data])
    assert _checks(folder) == {"rows": "ok", "landmarks": "ok", "pool": "ok", "rows in pool": "ok", "model": "ok"}

    # the tuned model's eval names the card of the rows it trained on
    scores = _metadata(instance, "eval_scores")
    assert scores["subset_card_id"] == meta["card_id"]
    by_model = {r.data["model"]: r.data["subset"] for r in scores["scores"].records}
    assert by_model["influence_distillation"] == meta["card_id"] and by_model["base"] == "none"

    # re-materializing the same selection leaves the same folder, byte for byte
    before = _bytes(folder)
    run_target(defs, instance, "arith", job="selection_job")
    assert _metadata(instance, "selected_subset")["export"] == str(folder) and _bytes(folder) == before

    # a mix hands off the same way, with the picking target per row
    run_target(defs, instance, "reading", job="selection_job")
    instance.add_dynamic_partitions("mixes", ["both"])
    assert defs.resolve_job_def("mix_job").execute_in_process(instance=instance, partition_key="both").success
    mix_folder = Path(_metadata(instance, "mixed_subset")["export"])
    mixed = datasets.load_dataset("parquet", data_dir=str(mix_folder), split="train")
    assert mixed.num_rows == 9 and sorted(set(mixed["target"])) == ["arith", "reading"]
    mix_card = export.read_provenance(mix_folder)
    assert mix_card["kind"] == "mix" and set(mix_card["targets"]) == {"arith", "reading"}
    assert set(_checks(mix_folder).values()) == {"ok"}
