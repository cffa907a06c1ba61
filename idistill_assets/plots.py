"""Metadata for the Dagster UI: matplotlib figures embedded in markdown as base64 PNG, and typed tables
(`MetadataValue.table` with a `TableSchema`) that the UI renders sortable, with column types."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import dagster as dg
import numpy as np


def png_markdown(fig, title: str) -> dg.MetadataValue:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


def _figure(width: float = 6.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def histogram(values: Sequence[float], title: str, xlabel: str, marks: Sequence[float] = ()) -> dg.MetadataValue:
    fig, ax = _figure()
    ax.hist(np.asarray(values, dtype=float), bins=40, color="#4c72b0")
    for mark in marks:
        ax.axvline(mark, color="#c44e52", linestyle="--", linewidth=1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    return png_markdown(fig, title)


def bars(counts: Mapping[str, float], title: str, ylabel: str, compare: Mapping[str, float] | None = None) -> dg.MetadataValue:
    fig, ax = _figure()
    names = list(counts)
    x = np.arange(len(names))
    if compare is None:
        ax.bar(x, [counts[n] for n in names], color="#4c72b0")
    else:
        ax.bar(x - 0.2, [counts[n] for n in names], width=0.4, label="selected", color="#4c72b0")
        ax.bar(x + 0.2, [compare.get(n, 0) for n in names], width=0.4, label="pool (scaled)", color="#dd8452")
        ax.legend()
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return png_markdown(fig, title)


def source_composition(counts: Mapping[str, int], pool_counts: Mapping[str, int], title: str) -> dict[str, dg.MetadataValue]:
    """The ``composition`` bars (selected vs the pool scaled to the subset's size) and ``sources`` table of a subset."""
    scale = sum(counts.values()) / max(1, sum(pool_counts.values()))
    return {
        "composition": bars(counts, title, "samples", compare={k: v * scale for k, v in pool_counts.items()}),
        "sources": table(
            [{"source": k, "selected": counts.get(k, 0), "pool": v} for k, v in pool_counts.items()],
            {"source": "string", "selected": "int", "pool": "int"},
        ),
    }


def _cell(value: object, kind: str) -> object:
    if value is None:
        return None
    if kind == "float":
        return float(value)
    if kind == "int":
        return int(value)
    if kind == "bool":
        return bool(value)
    return str(value).replace("\n", " ")[:200]


def table(rows: Sequence[Mapping[str, object]], columns: Mapping[str, str]) -> dg.MetadataValue:
    """A typed table: ``columns`` maps each column name to a TableColumn type (string, int, float, bool)."""
    schema = dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in columns.items()])
    records = [dg.TableRecord({c: _cell(row.get(c), k) for c, k in columns.items()}) for row in rows]
    return dg.MetadataValue.table(records=records, schema=schema)


def column_schema(schema: Mapping[str, object], descriptions: Mapping[str, str]) -> dg.TableSchema:
    """A Dagster column schema from a polars schema (name -> dtype), with a description per known column."""
    return dg.TableSchema(
        columns=[dg.TableColumn(name, str(dtype), description=descriptions.get(name)) for name, dtype in schema.items()]
    )


def line(values: Sequence[float], title: str, xlabel: str, ylabel: str) -> dg.MetadataValue:
    fig, ax = _figure()
    ax.plot(np.arange(1, len(values) + 1), np.asarray(values, dtype=float), color="#4c72b0")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return png_markdown(fig, title)


def budget_curve(points: Sequence[Mapping[str, float]], title: str, budget: int | None = None) -> dg.MetadataValue:
    """The second-order model's predicted target-loss change at each budget, with first order's beside it."""
    fig, ax = _figure()
    ks = [p["k"] for p in points]
    ax.plot(ks, [p["predicted_change"] for p in points], marker="o", color="#4c72b0", label="second order (QP weights)")
    ax.plot(ks, [p["first_order_change"] for p in points], marker="s", linestyle="--", color="#dd8452",
            label="first order (top-k)")
    if budget is not None:
        ax.axvline(budget, color="#c44e52", linestyle=":", linewidth=1, label=f"budget {budget}")
    ax.set_xscale("log")
    ax.set_xlabel("budget k (samples)")
    ax.set_ylabel("predicted Δ target loss")
    ax.set_title(title)
    ax.legend()
    return png_markdown(fig, title)
