"""OUTPUT/report.html for a study: what survives which purification, at a glance.

- a heatmap per scenario of *protection retained*: rows method/eps, columns purification,
  value = damage under the purification / damage under `none` (1: the purification removes
  nothing of the protection, 0: it removes all of it);
- curves of mimic damage against purification strength, one panel per purification family;
- sample grids: the same image through each purification (rows) for the clean and each
  protected copy (columns: purified input | mimic output);
- the retained table and the damage table in full.

Damage is read on one headline metric per scenario (HEADLINES), averaged over its settings:
PSNR of the mimic's output against the clean original for SDEdit and inpainting (calibrated
for any backbone); for the training mimics the style score (metrics/style.py: style accuracy when the
cells have one, i.e. with --style-references, else style distance), CLIP image similarity for tables
written before it existed.
"""

from __future__ import annotations

import html
import io
import math

import numpy as np
import pandas as pd

from pipeline.io.html import figure_png, img, label, page, pyplot, verdict_items
from pipeline.io.tables import load_schema
from pipeline.study.grid import Cell, Source, slug
from pipeline.study.store import TABLE_DIR, StudyStore

_STYLE_FIRST = ("style_accuracy", "style_distance", "clip_i2i_ref")
HEADLINES = {"sdedit": ("psnr_ref",), "inpaint": ("psnr_ref",), "textual_inversion": _STYLE_FIRST,
             "lora": _STYLE_FIRST, "dreambooth": _STYLE_FIRST}  # per scenario, in order of preference: the first the table has


def headline_metrics(df: pd.DataFrame) -> dict[str, str]:
    """The headline metric of each scenario in `df`: the first of HEADLINES[scenario] that has rows."""
    out = {}
    for scenario, options in HEADLINES.items():
        present = set(df.loc[df["scenario"] == scenario, "metric"])
        out[scenario] = next((m for m in options if m in present), options[0])
    return out


def read_table(output: str, s3: dict | None = None) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = StudyStore(output, s3)
    schema = load_schema("robustness")
    files = sorted(store.files(TABLE_DIR, ".parquet"))
    if not files:
        return schema.empty_table().to_pandas()
    return pa.concat_tables([pq.read_table(f, filesystem=store.fs, schema=schema) for f in files]).to_pandas()


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """Per (method, eps, purification, scenario): mean damage on the scenario's headline metric."""
    rows = df[(df["method"] != "none") & (df["metric"] == df["scenario"].map(headline_metrics(df)))]
    if rows.empty:
        return pd.DataFrame(columns=["method", "eps", "purification", "purification_name", "strength", "scenario",
                                     "damage"])
    keys = ["method", "eps", "purification", "purification_name", "strength", "scenario"]
    return rows.groupby(keys, dropna=False, as_index=False)["damage"].mean()


def retained(df: pd.DataFrame) -> pd.DataFrame:
    """headline damage with `retained` = damage / damage under `none` (NaN without a `none` column)."""
    h = headline(df)
    if h.empty:
        return h.assign(retained=[])
    ref = h[h["purification"] == "none"].set_index(["method", "eps", "scenario"])["damage"]
    idx = pd.MultiIndex.from_frame(h[["method", "eps", "scenario"]])
    base = ref.reindex(idx).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.abs(base) > 1e-9, h["damage"].to_numpy(dtype=float) / base, np.nan)
    return h.assign(retained=ratio)


def retained_matrix(df: pd.DataFrame, scenario: str, purifications: list[str] | None = None) -> pd.DataFrame:
    r = retained(df)
    r = r[r["scenario"] == scenario]
    if r.empty:
        return pd.DataFrame()
    r = r.assign(row=[label(m, e) for m, e in zip(r["method"], r["eps"])])
    m = r.pivot_table(index="row", columns="purification", values="retained", aggfunc="mean", dropna=False)
    order = purifications or sorted(dict.fromkeys(df["purification"]), key=lambda p: (p != "none", p))
    order = [p for p in order if p in m.columns]
    return m[order]


# the share of its unpurified damage a protection keeps after a purification: (survives, weakened) thresholds
SURVIVAL = (0.75, 0.25)
SURVIVAL_RULE = ("survives: after the purification the protection still does at least 75% of the damage to the mimic "
                 "it does unpurified; weakened: 25-75%; removed: less than 25%. No verdict where the protection does "
                 "no damage even unpurified, or too little to judge: under 0.1 dB of PSNR, or (an accuracy) one "
                 "generated image's worth or less.")
COUNTED_METRICS = ("style_accuracy",)  # a share of generated images: one image is its resolution
MIN_DAMAGE = {"psnr_ref": 0.1}  # dB: a smaller change of the mimic's PSNR is invisible (and a ratio of noise)


def images_behind(df: pd.DataFrame) -> dict[tuple, int]:
    """(method, eps, scenario) -> how many generated images the unpurified headline accuracy averages over
    (summed over groups); only for COUNTED_METRICS and tables that record n_images."""
    if "n_images" not in df.columns:
        return {}
    rows = df[(df["purification"] == "none") & df["metric"].isin(COUNTED_METRICS) & (df["method"] != "none")
              & (df["metric"] == df["scenario"].map(headline_metrics(df)))]
    return {k: int(v) for k, v in rows.groupby(["method", "eps", "scenario"])["n_images"].sum().items()}


def survival(df: pd.DataFrame) -> list[dict]:
    """Per (scenario, method, eps, purification other than none): survives / weakened / removed, and why in words."""
    r = retained(df)
    if r.empty:
        return []
    unpurified = r[r["purification"] == "none"].set_index(["method", "eps", "scenario"])["damage"]
    out = []
    chosen = headline_metrics(df)
    counted = images_behind(df)
    for row in r[r["purification"] != "none"].itertuples(index=False):
        base = unpurified.get((row.method, row.eps, row.scenario), math.nan)
        metric = chosen.get(row.scenario, "")
        n = counted.get((row.method, row.eps, row.scenario))
        v = {"scenario": row.scenario, "method": row.method, "eps": row.eps, "purification": row.purification,
             "retained": row.retained, "damage": row.damage, "unpurified": base, "verdict": None}
        if not base > 1e-9 or math.isnan(row.retained):
            v["words"] = f"the protection does no damage to the mimic even unpurified ({metric} {base:+.3g})"
        elif base < MIN_DAMAGE.get(metric, 0.0):
            v["words"] = (f"its unpurified damage ({metric} {base:+.3g}) is under {MIN_DAMAGE[metric]:g} dB: too small "
                          "to judge")
        elif n and base <= 1 / n + 1e-9:
            v["words"] = (f"its unpurified damage ({metric} {base:+.3g}) is one generated image of {n} or less: "
                          "too few to judge")
        else:
            v["verdict"] = ("survives" if row.retained >= SURVIVAL[0] else "weakened" if row.retained >= SURVIVAL[1]
                            else "removed")
            v["words"] = (f"keeps {row.retained:.0%} of its damage ({metric} damage {row.damage:+.3g} after "
                          f"{row.purification}, {base:+.3g} unpurified)")
        out.append(v)
    return sorted(out, key=lambda v: (v["scenario"], v["purification"], v["method"], v["eps"]))


# the attacks aimed at encoder protections (issue 22) and DiffPure, their ancestor: named in the summary
ADAPTIVE_ATTACKS = ("diffpure", "gridpure", "pdmpure", "cat")


def adaptive_summary(df: pd.DataFrame) -> list[str]:
    """One plain sentence per (scenario, adaptive attack) in the table: which protections survive it, which it
    weakens, which it removes (`survival`'s verdicts, protections as "method eps")."""
    by: dict[tuple[str, str], dict[str, list[str]]] = {}
    for v in survival(df):
        if v["purification"].split(":", 1)[0] not in ADAPTIVE_ATTACKS:
            continue
        slot = by.setdefault((v["scenario"], v["purification"]), {})
        slot.setdefault(v["verdict"] or "no verdict", []).append(label(v["method"], v["eps"]))
    lines = []
    for (scenario, attack), verdicts in sorted(by.items()):
        parts = [f"{word} {', '.join(verdicts[word])}" for word in ("survives", "weakened", "removed", "no verdict")
                 if verdicts.get(word)]
        lines.append(f"against {attack} ({scenario} mimic): " + "; ".join(parts))
    return lines


def format_survival(df: pd.DataFrame) -> str:
    """The study's verdict in words, one line per scenario, purification and protection (what `study` prints)."""
    lines = [f"  {v['scenario']}, {v['purification']}: {label(v['method'], v['eps'])}: "
             f"{(v['verdict'] or 'no verdict').upper()}: {v['words']}" for v in survival(df)]
    if lines:  # the adaptive attacks first, in one sentence each
        lines = [f"  {line}" for line in adaptive_summary(df)] + lines
    if not lines:
        return "  no protected cell with a purification to judge"
    if not df.empty and not bool(df["calibrated"].all()):
        lines.append("  (uncalibrated: a built-in model (toy or random weights) or a random metric backbone; these rank settings within this run "
                     "and do not measure protection on a real model)")
    return "\n".join(lines)


def _survival_html(df: pd.DataFrame) -> str:
    rows = survival(df)
    if not rows:
        return ""
    items = verdict_items([{**v, "purification": html.escape(v["purification"])} for v in rows], " after {purification}")
    adaptive = "".join(f"<li>{html.escape(line)}</li>" for line in adaptive_summary(df))
    adaptive = f"<h3>The adaptive attacks</h3><ul>{adaptive}</ul>" if adaptive else ""
    return (f"<section id='verdict'><h2>Verdict: does the protection survive?</h2>{adaptive}"
            f"<ul class='verdict'>{items}</ul>"
            f"<p class='note'>{html.escape(SURVIVAL_RULE)}</p></section>")


def heatmap_figure(matrix: pd.DataFrame, title: str):
    """The retained matrix as a red-to-green heatmap, each cell's value written in it ("-" where unknown)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.1 * matrix.shape[1] + 2.5, 0.45 * matrix.shape[0] + 1.6))
    values = matrix.to_numpy(dtype=float)
    im = ax.imshow(np.clip(values, 0, 1.2), cmap="RdYlGn", vmin=0, vmax=1.2, aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=45, ha="right")
    ax.set_yticks(range(matrix.shape[0]), matrix.index)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            dark = not math.isnan(v) and (v < 0.2 or v > 1.0)  # the colour map's ends are dark: white text there
            ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="protection retained")
    return fig


def heatmap_png(matrix: pd.DataFrame, title: str) -> bytes:
    return figure_png(heatmap_figure(matrix, title))


def curves_png(df: pd.DataFrame, scenario: str) -> bytes | None:
    plt = pyplot()
    h = headline(df)
    h = h[(h["scenario"] == scenario) & (h["purification_name"] != "none")]
    families = sorted(h["purification_name"].unique())
    if not families:
        return None
    fig, axes = plt.subplots(1, len(families), figsize=(3.2 * len(families), 2.8), squeeze=False)
    for ax, family in zip(axes[0], families):
        f = h[h["purification_name"] == family]
        for (method, eps), g in f.groupby(["method", "eps"]):
            g = g.sort_values("strength")
            ax.plot(g["strength"], g["damage"], marker="o", label=label(method, eps))
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_title(family)
        ax.set_xlabel("strength")
    axes[0][0].set_ylabel(f"damage ({headline_metrics(df).get(scenario, '')})")
    axes[0][-1].legend(fontsize=7, loc="best")
    return figure_png(fig)


def sample_grid(store: StudyStore, df: pd.DataFrame, scenario: str, size: int = 64) -> list[tuple[str, bytes]]:
    """(key, PNG) grids: rows purifications, columns (input | output) per source."""
    from PIL import Image

    d = df[df["scenario"] == scenario]
    sources = list(dict.fromkeys((m, e) for m, e in zip(d["method"], d["eps"])))
    sources.sort(key=lambda s: (s[0] != "none", s[0], s[1]))
    purifications = list(dict.fromkeys(d["purification"]))
    keys = set()
    cells = {}
    for p in purifications:
        for m, e in sources:
            cell = Cell(Source(m, float(e)), p, scenario)
            files = store.files(f"samples/study/{scenario}/{cell.id}", ".png")
            cells[(p, m, e)] = {f.rsplit("/", 1)[1]: f for f in files}
            keys |= {f.rsplit("/", 1)[1].rsplit(".", 2)[0] for f in files}
    out = []
    for key in sorted(keys)[:2]:
        pad = 2
        canvas = Image.new("RGB", (len(sources) * 2 * (size + pad) + pad, len(purifications) * (size + pad) + pad),
                           "white")
        for i, p in enumerate(purifications):
            for j, (m, e) in enumerate(sources):
                for k, kind in enumerate(("in", "out")):
                    path = cells.get((p, m, e), {}).get(f"{slug(key)}.{kind}.png")
                    if path is None:
                        continue
                    tile = Image.open(io.BytesIO(store.read(path))).convert("RGB").resize((size, size))
                    canvas.paste(tile, (pad + (2 * j + k) * (size + pad), pad + i * (size + pad)))
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")
        caption = (f"{key}: rows {', '.join(purifications)}; column pairs (purified input | mimic output) for "
                   + ", ".join(label(m, e) for m, e in sources))
        out.append((caption, buf.getvalue()))
    return out


def build_report(output: str, s3: dict | None = None) -> str:
    df = read_table(output, s3)
    store = StudyStore(output, s3)
    parts = [f"<h1>Robustness study: {html.escape(output)}</h1>"]
    if df.empty:
        parts.append("<p>No cells yet.</p>")
        return page("mimicshield study", parts)
    uncalibrated = not bool(df["calibrated"].all())
    parts.append(_survival_html(df))
    parts.append(f"<p>{df['method'].ne('none').sum()} protected and {df['method'].eq('none').sum()} baseline rows; "
                 f"{df.groupby(['method', 'eps', 'purification', 'scenario']).ngroups} cells. "
                 "Protection retained = damage under the purification / damage with no purification, damage "
                 "being how much worse the mimic copies the clean original than it does from the equally purified "
                 "clean image (headline metric: " + ", ".join(f"{k} {v}" for k, v in headline_metrics(df).items()
                                                             if k in set(df["scenario"])) + ").</p>")
    if uncalibrated:
        parts.append("<p class='note'><b>Uncalibrated:</b> some rows come from a built-in model (toy or random "
                     "weights) or a random metric backbone (calibrated = false); they check the machinery and rank settings within this run, "
                     "they do not measure protection on a real model.</p>")
    purifications = sorted(dict.fromkeys(df["purification"]), key=lambda p: (p != "none", p))
    for scenario in dict.fromkeys(df["scenario"]):
        parts.append(f"<h2>{html.escape(scenario)}</h2>")
        matrix = retained_matrix(df, scenario, purifications)
        if not matrix.empty:
            parts.append(img(heatmap_png(matrix, f"{scenario}: protection retained ({headline_metrics(df)[scenario]})"),
                             "heatmap"))
            parts.append(matrix.round(3).to_html(na_rep="-"))
        curves = curves_png(df, scenario)
        if curves:
            parts.append("<h3>Damage vs purification strength</h3>" + img(curves, "curves"))
        for caption, data in sample_grid(store, df, scenario):
            parts.append(f"<h3>Samples</h3><p class='note'>{html.escape(caption)}</p>" + img(data, caption))
    parts.append("<h2>All rows</h2>")
    cols = ["method", "eps", "purification", "scenario", "setting", "metric", "value", "baseline", "damage",
            "n_images", "calibrated", "seconds"]
    parts.append(df[cols].sort_values(cols[:6]).round(4).to_html(index=False, na_rep="-"))
    return page("mimicshield study", parts)


def write_report(output: str, s3: dict | None = None) -> str:
    """Build OUTPUT/report.html; returns its URI."""
    store = StudyStore(output, s3)
    store.write_atomic(f"{store.root}/report.html", build_report(output, s3).encode())
    return f"{store.output}/report.html"


def format_summary(df: pd.DataFrame) -> str:
    """The retained matrices as text, for the terminal."""
    out = []
    for scenario in dict.fromkeys(df["scenario"]):
        m = retained_matrix(df, scenario)
        if not m.empty:
            out.append(f"protection retained, {scenario} ({headline_metrics(df).get(scenario)}):\n{m.round(2).to_string()}")
    return "\n\n".join(out)
