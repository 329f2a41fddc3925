"""`OUTPUT/report.html`: one self-contained page summarising an evaluation output folder.

Reads ``OUTPUT/tables/mimicry_metrics/*.parquet`` and the sample grids under ``OUTPUT/samples/``
(local or s3://), and writes one HTML file whose images (sample grids, matplotlib plots) are
embedded as base64 data URIs, so it opens in any browser from anywhere, no server, no
neighbouring files. `summary_table` is what the CLI prints in the terminal.
"""

from __future__ import annotations

import html
import json
import math

import numpy as np
import pandas as pd

from pipeline.io.files import write_atomic
from pipeline.io.html import figure_png, img, label, page, pyplot
from pipeline.io.storage import split_uri, to_uri
from pipeline.io.tables import load_schema

TABLE = "mimicry_metrics"


def read_metrics(output: str, s3=None) -> pd.DataFrame:
    """Every mimicry_metrics file under OUTPUT as one DataFrame (empty, with the columns, when none)."""
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    fs, root = split_uri(output, s3)
    folder = f"{root}/tables/{TABLE}"
    schema = load_schema(TABLE)
    try:
        files = [f.path for f in fs.get_file_info(pafs.FileSelector(folder, recursive=False))
                 if f.type == pafs.FileType.File and f.path.endswith(".parquet")]
    except FileNotFoundError:
        files = []
    if not files:
        return schema.empty_table().to_pandas()
    tables = [pq.read_table(p, filesystem=fs, schema=schema) for p in sorted(files)]
    import pyarrow as pa

    return pa.concat_tables(tables).to_pandas()


def read_samples(output: str, s3=None, limit: int = 12) -> list[dict]:
    """Sample grid descriptions (JSON) with their PNG bytes, at most `limit` per scenario."""
    from pyarrow import fs as pafs

    fs, root = split_uri(output, s3)
    try:
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/samples", recursive=True))
    except FileNotFoundError:
        return []
    out, per_scenario = [], {}
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File or not info.path.endswith(".json"):
            continue
        with fs.open_input_stream(info.path) as f:
            meta = json.loads(f.read())
        if per_scenario.get(meta["scenario"], 0) >= limit:
            continue
        try:
            with fs.open_input_stream(info.path[: -len(".json")] + ".png") as f:
                meta["png"] = f.read()
        except FileNotFoundError:
            continue
        per_scenario[meta["scenario"]] = per_scenario.get(meta["scenario"], 0) + 1
        out.append(meta)
    return out


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean value per (scenario, metric) x (method, eps), averaged over runs, groups and settings."""
    if df.empty:
        return pd.DataFrame()
    d = df.assign(column=[label(m, e) for m, e in zip(df["method"], df["eps"])])
    return d.pivot_table(index=["scenario", "metric"], columns="column", values="value", aggfunc="mean")


def _plot_png(df: pd.DataFrame, scenario: str) -> bytes:
    plt = pyplot()
    d = df[df["scenario"] == scenario]
    metrics = sorted(d["metric"].unique())
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        m = d[d["metric"] == metric]
        protected = m[m["method"] != "none"]
        for method, part in protected.groupby("method"):
            series = part.groupby("eps")["value"].mean().sort_index()
            ax.plot(series.index, series.values, marker="o", label=method)
        base = m[m["method"] == "none"]["value"]
        if len(base):
            ax.axhline(float(base.mean()), color="gray", linestyle="--", label="none (clean)")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("eps (0-255)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=7)
    fig.suptitle(scenario, fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.9, 0.95))
    return figure_png(fig, tight=False)


def build_report(output: str, s3=None, max_samples: int = 12) -> tuple[str, pd.DataFrame]:
    """Write OUTPUT/report.html; returns (its URI, the summary table)."""
    df = read_metrics(output, s3)
    samples = read_samples(output, s3, limit=max_samples)
    summary = summary_table(df)
    parts = [f"<h1>mimicshield evaluation report</h1><p class='note'>{html.escape(to_uri(*split_uri(output, s3)))}"
             f" &middot; {len(df)} metric rows &middot; runs: {html.escape(', '.join(sorted(df['run'].unique())) or '-')}"
             f"</p>"]
    if not df.empty and not df["calibrated"].all():
        parts.append("<p class='note'><b>Uncalibrated rows present</b>: some metric backbones (LPIPS, CLIP, "
                     "FID/KID features) or the mimic model had random weights; such values rank settings within "
                     "this run but are not comparable with published figures.</p>")
    parts.append("<h2>Summary</h2><p class='note'>Mean per scenario and metric, over runs, groups and settings. "
                 "'none (clean)' is the same mimic on the clean images: protection works when the protected "
                 "columns are far from it (higher lpips/fid/kid, lower psnr/ssim/clip similarity).</p>")
    parts.append(summary.to_html(float_format=lambda v: f"{v:.4g}", na_rep="-") if not summary.empty
                 else "<p>No metric rows found.</p>")
    parts.append("<h2>Samples</h2>")
    for scenario in dict.fromkeys(s["scenario"] for s in samples):
        parts.append(f"<h3>{html.escape(scenario)}</h3>")
        for s in [s for s in samples if s["scenario"] == scenario]:
            cap = (f"<b>{html.escape(str(s.get('key') or s.get('name')))}</b> group {html.escape(str(s['group']))}, "
                   f"{html.escape(label(s.get('method', '?'), float(s.get('eps') or 0)))}<br>rows: "
                   f"{html.escape(' / '.join(s.get('rows', [])))}<br>columns: "
                   f"{html.escape(', '.join(map(str, s.get('columns', []))))}")
            alt = f"{scenario} {s.get('name')}"
            parts.append(f"<div class='sample'>{img(s['png'], alt, 'grid')}{cap}</div>")
    if not df.empty:
        parts.append("<h2>Metrics per method and budget</h2>")
        for scenario in sorted(df["scenario"].unique()):
            parts.append(img(_plot_png(df, scenario), f"plot {scenario}", "plot"))
        parts.append("<h2>All rows</h2>")
        full = df.sort_values(["scenario", "setting", "metric", "method", "eps", "group"])
        parts.append(full.to_html(index=False, float_format=lambda v: f"{v:.4g}"))
    fs, root = split_uri(output, s3)
    write_atomic(fs, f"{root}/report.html", page("mimicshield report", parts).encode())
    return to_uri(fs, f"{root}/report.html"), summary


def format_summary(summary: pd.DataFrame) -> str:
    if summary.empty:
        return "no mimicry metrics found"
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.max_rows", 500):
        return summary.map(lambda v: np.nan if v is None else v).to_string(float_format=lambda v: f"{v:.4g}")
