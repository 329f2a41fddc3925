"""`OUTPUT/report.html`: one self-contained page summarising an evaluation output folder.

Reads ``OUTPUT/tables/mimicry_metrics/*.parquet`` and the sample grids under ``OUTPUT/samples/``
(local or s3://), and writes one HTML file whose images (sample grids, matplotlib plots) are
embedded as base64 data URIs, so it opens in any browser from anywhere, no server, no
neighbouring files; each sample grid also links to its full-size PNG under ``OUTPUT/samples/`` (a
relative link: it opens while the page sits in OUTPUT). `summary_table` is what the CLI prints in the
terminal.
"""

from __future__ import annotations

import html
import json
import math

import numpy as np
import pandas as pd

from pipeline.io.files import write_atomic
from pipeline.io.html import figure_png, img, label, page, pyplot, verdict_items
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
        png_path = info.path[: -len(".json")] + ".png"
        try:
            with fs.open_input_stream(png_path) as f:
                meta["png"] = f.read()
        except FileNotFoundError:
            continue
        meta["href"] = png_path[len(root) + 1 :]  # relative to OUTPUT, where report.html is
        per_scenario[meta["scenario"]] = per_scenario.get(meta["scenario"], 0) + 1
        out.append(meta)
    return out


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean value per (scenario, metric) x (method, eps), averaged over runs, groups and settings."""
    if df.empty:
        return pd.DataFrame()
    d = df.assign(column=[label(m, e) for m, e in zip(df["method"], df["eps"])])
    return d.pivot_table(index=["scenario", "metric"], columns="column", values="value", aggfunc="mean")


# ---------------------------------------------------------------- the verdict

# metric -> (in words, direction: +1 when a larger value means the mimic is further from the artist's image)
GLOSSARY = {
    "psnr_ref": ("PSNR between the mimic's output and the artist's (clean) image, dB; lower = the copy is further", -1),
    "ssim_ref": ("SSIM between the mimic's output and the artist's image, 0-1; lower = further", -1),
    "lpips_ref": ("LPIPS perceptual distance between the mimic's output and the artist's image; higher = further", +1),
    "clip_i2i_ref": ("CLIP image similarity of the mimic's output to the artist's images, 0-100; lower = further", -1),
    "psnr_pair": ("PSNR between the mimic of the protected image and the mimic of the clean one, dB; lower = "
                  "protection changed the copy more", -1),
    "ssim_pair": ("SSIM between the two mimics' outputs (protected vs clean input); lower = changed more", -1),
    "lpips_pair": ("LPIPS between the two mimics' outputs (protected vs clean input); higher = changed more", +1),
    "clip_i2i_pair": ("CLIP similarity between the two mimics' outputs, 0-100; lower = changed more", -1),
    "fid": ("FID of the generated set against the artist's images; higher = further", +1),
    "kid": ("KID of the generated set against the artist's images; higher = further", +1),
    "clip_score": ("CLIP similarity of generated images to their prompt; lower = the mimic follows it less", -1),
    "style_accuracy": ("fraction of generated images whose nearest style (Gram + palette descriptor) is the "
                       "artist's own among the candidate styles; lower = the mimic lost the style", -1),
    "style_distance": ("distance of generated images to the artist's style, in units of the artist's own spread "
                       "(about 1 = as close as the artist's images); higher = further", +1),
    "psnr": ("visibility: PSNR of the protected image against the clean one, dB; higher = less visible", +1),
    "ssim": ("visibility: SSIM of the protected image against the clean one; higher = less visible", +1),
    "lpips": ("visibility: LPIPS of the protected image against the clean one; lower = less visible", -1),
}
# the figure a verdict rests on, in order of preference, with (protected, weak) thresholds on how much
# further the mimic of the protected images is from the artist's image than the mimic of the clean ones
VERDICT_METRICS = {"style_accuracy": (0.5, 0.2), "style_distance": (1.0, 0.3),  # the training mimics' style score
                   "lpips_ref": (0.10, 0.03), "ssim_ref": (0.10, 0.03), "psnr_ref": (3.0, 1.0),
                   "clip_i2i_ref": (5.0, 2.0), "fid": (50.0, 15.0)}
VERDICT_NAMES = {"style_accuracy": "style accuracy", "style_distance": "style distance", "lpips_ref": "LPIPS",
                 "ssim_ref": "SSIM", "psnr_ref": "PSNR", "clip_i2i_ref": "CLIP similarity", "fid": "FID"}
VERDICT_RULE = ("protected: the mimic of the protected images is at least as far again from the artist's image as the "
                "first threshold (style accuracy -0.5, style distance +1.0, LPIPS +0.10, SSIM -0.10, PSNR -3 dB, "
                "CLIP -5, FID +50) beyond the mimic of the clean images; weak: at least the second (style accuracy "
                "-0.2, style distance +0.3, LPIPS +0.03, SSIM -0.03, PSNR -1 dB, CLIP -2, FID +15); not protected: "
                "less. Each verdict uses the first calibrated figure of style accuracy, style distance (the training "
                "mimics), LPIPS, SSIM, PSNR, CLIP, FID (uncalibrated figures never count).")


def verdicts(df: pd.DataFrame) -> list[dict]:
    """One verdict per (method, eps, mimic scenario): protected / weak / not protected, with its figure.

    Only calibrated rows count; a scenario whose every figure is uncalibrated gets verdict None and says why.
    """
    out = []
    if df.empty:
        return out
    mimic = df[df["scenario"] != "visibility"]
    base = mimic[mimic["method"] == "none"]
    for (method, eps, scenario), part in mimic[mimic["method"] != "none"].groupby(["method", "eps", "scenario"],
                                                                                 dropna=False):
        row = {"method": method, "eps": eps, "scenario": scenario, "verdict": None, "metric": None, "words": ""}
        for metric, (strong, weak) in VERDICT_METRICS.items():
            prot = part[(part["metric"] == metric) & part["calibrated"]]
            clean = base[(base["scenario"] == scenario) & (base["metric"] == metric) & base["calibrated"]]
            if prot.empty or clean.empty:
                continue
            p, c = float(prot["value"].mean()), float(clean["value"].mean())
            further = (p - c) * GLOSSARY[metric][1]
            row.update(metric=metric, protected_value=p, clean_value=c, further=further,
                       verdict="protected" if further >= strong else "weak" if further >= weak else "not protected")
            name = VERDICT_NAMES[metric]
            row["words"] = (f"{scenario} copies of the protected images are {further:+.3g} {name} further from the "
                            f"artist's image than copies of the clean ones ({name} {p:.3g} vs {c:.3g})")
            break
        else:
            row["words"] = ("every figure is uncalibrated (random metric backbones or a "
                            "built-in mimic model: a toy trained on a few photos or random weights, whose figures say nothing about "
                            "real checkpoints); see the uncalibrated table")
        out.append(row)
    return out


def format_verdicts(df: pd.DataFrame) -> str:
    """The verdicts in words, one line each (what `evaluate` prints at its end)."""
    lines = []
    for v in verdicts(df):
        what = label(v["method"], float(v["eps"]))
        lines.append(f"  {what} vs {v['scenario']}: {(v['verdict'] or 'no verdict').upper()}: {v['words']}")
    if lines:
        lines.append("  (no equal-budget noise baseline in this run)")
    return "\n".join(lines) or "  no protected/clean mimic pairs to judge"


def _verdict_html(df: pd.DataFrame) -> str:
    rows = verdicts(df)
    if not rows:
        return "<section id='verdict'><h2>Verdict</h2><p>No protected/clean mimic pairs to judge.</p></section>"
    items = verdict_items(rows)
    return (f"<section id='verdict'><h2>Verdict</h2><ul class='verdict'>{items}</ul><p class='note'>"
            f"{html.escape(VERDICT_RULE)} No equal-budget noise baseline in this run, so protection is compared "
            "with the clean images only.</p></section>")


def _glossary_html(metrics) -> str:
    items = "".join(f"<li><code>{html.escape(m)}</code>: {html.escape(GLOSSARY[m][0])}</li>"
                    for m in sorted(metrics) if m in GLOSSARY)
    return f"<h2>What each metric means</h2><ul class='glossary'>{items}</ul>" if items else ""


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


def _sample_html(s: dict) -> str:
    """One sample grid, a link to its full-size PNG, and a caption saying what each row and column is."""
    def esc(value) -> str:
        return html.escape(str(value))

    lines = [f"<b>{esc(s.get('key') or s.get('name'))}</b> group {esc(s['group'])}, "
             f"{esc(label(s.get('method', '?'), float(s.get('eps') or 0)))}"]
    if s.get("columns"):
        lines.append(f"columns: {esc(' | '.join(map(str, s['columns'])))}")
    if s.get("rows"):
        lines.append("rows, top to bottom: " + "; ".join(f"{i}. {esc(r)}" for i, r in enumerate(s["rows"], 1)))
    if s.get("mimic_input"):
        words = s["mimic_input"][:1].upper() + s["mimic_input"][1:]
        lines.append(f"{esc(words)}; each cell is shown at {esc(s.get('cell_px', 256))} px, "
                     "differences amplified to fill the 8-bit range.")
    picture = img(s["png"], f"{s['scenario']} {s.get('name')}", "grid")
    if s.get("href"):
        picture = f"<a href='{html.escape(s['href'], quote=True)}' title='full-size PNG'>{picture}</a>"
        lines.append("Click the grid for the full-size PNG.")
    return f"<div class='sample'>{picture}{'<br>'.join(lines)}</div>"


def build_report(output: str, s3=None, max_samples: int = 12) -> tuple[str, pd.DataFrame]:
    """Write OUTPUT/report.html; returns (its URI, the summary table)."""
    df = read_metrics(output, s3)
    samples = read_samples(output, s3, limit=max_samples)
    summary = summary_table(df)
    parts = [f"<h1>mimicshield evaluation report</h1><p class='note'>{html.escape(to_uri(*split_uri(output, s3)))}"
             f" &middot; {len(df)} metric rows &middot; runs: {html.escape(', '.join(sorted(df['run'].unique())) or '-')}"
             f"</p>"]
    parts.append(_verdict_html(df))
    calibrated = df[df["calibrated"]] if not df.empty else df
    uncalibrated = df[~df["calibrated"]] if not df.empty else df
    parts.append("<h2>Summary (calibrated figures)</h2><p class='note'>Mean per scenario and metric, over runs, groups "
                 "and settings. 'none (clean)' is the same mimic on the clean images.</p>")
    summary_cal = summary_table(calibrated)
    parts.append(summary_cal.to_html(float_format=lambda v: f"{v:.4g}", na_rep="-") if not summary_cal.empty
                 else "<p>No calibrated figures in this evaluation.</p>" if not df.empty else "<p>No metric rows found.</p>")
    if not uncalibrated.empty:
        parts.append("<h2>Uncalibrated figures (not in the verdict)</h2><p class='note'><b>Uncalibrated rows "
                     "present</b>: some metric backbones (LPIPS, CLIP, FID/KID features) or the mimic model had random "
                     "weights; such values rank settings within this run but are not comparable with published "
                     "figures and never count in the verdict.</p>")
        parts.append("<div class='uncalibrated'>" + summary_table(uncalibrated).to_html(
            float_format=lambda v: f"{v:.4g}", na_rep="-") + "</div>")
    if not df.empty:
        parts.append(_glossary_html(df["metric"].unique()))
    parts.append("<h2>Samples</h2>")
    for scenario in dict.fromkeys(s["scenario"] for s in samples):
        parts.append(f"<h3>{html.escape(scenario)}</h3>")
        parts += [_sample_html(s) for s in samples if s["scenario"] == scenario]
    if not df.empty and df.loc[df["method"] != "none", "eps"].nunique() >= 2:  # a plot needs 2+ budgets
        parts.append("<h2>Metrics per method and budget</h2>")
        for scenario in sorted(df["scenario"].unique()):
            parts.append(img(_plot_png(df, scenario), f"plot {scenario}", "plot"))
    if not df.empty:
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
