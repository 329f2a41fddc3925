"""The report toolkit: one look and one set of helpers for every self-contained HTML page we write.

`report.html` of an evaluation (evaluate/report.py) and of a robustness study (study/report.py) are
single files: images are embedded as base64 data URIs, so a page opens anywhere, with no server and no
neighbouring files. Both are built from these pieces.
"""

from __future__ import annotations

import base64
import html
import io
import math

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc} h3{font-size:1em}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f4f4f4} .sample{display:inline-block;margin:0 1em 1em 0;vertical-align:top;font-size:11px;max-width:100%}
.sample img{max-width:100%} ul.verdict{font-size:15px;line-height:1.5} .uncalibrated{opacity:.75}
.sample img{display:block;image-rendering:pixelated;border:1px solid #ccc} .note{color:#666;font-size:12px}
"""


def label(method: str, eps: float) -> str:
    """How a protection is named in every table and plot: "none (clean)", "sds- eps=8", or the method alone."""
    if method == "none":
        return "none (clean)"
    return method if isinstance(eps, float) and math.isnan(eps) else f"{method} eps={eps:g}"


# the colour of each verdict word, in the evaluation's and the study's reports
VERDICT_COLOURS = {"protected": "#1a7f37", "survives": "#1a7f37", "weak": "#b35900", "weakened": "#b35900",
                   "not protected": "#b42318", "removed": "#b42318", None: "#555"}


def verdict_items(rows: list[dict], what: str = "") -> str:
    """<li> per verdict row: the verdict in its colour, then "<method eps> <what> against <scenario>: <words>";
    `what` is inserted as given (the study's "after <purification>")."""
    return "".join(
        f"<li><b style='color:{VERDICT_COLOURS[v['verdict']]}'>{html.escape((v['verdict'] or 'no verdict').upper())}"
        f"</b> &mdash; {html.escape(label(v['method'], float(v['eps'])))}{what.format(**v)} against "
        f"{html.escape(v['scenario'])}: {html.escape(v['words'])}</li>" for v in rows)


def img(data: bytes, alt: str, cls: str = "") -> str:
    """An <img> with the PNG `data` embedded."""
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def page(title: str, body: list[str]) -> str:
    """A whole page: head with the shared CSS, then the body parts in order."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")


def figure_png(fig, tight: bool = True) -> bytes:
    """A matplotlib figure as PNG bytes (and closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    return buf.getvalue()


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
