"""report.html: built from a mimicry_metrics table and sample grids, opened in headless Chromium."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluate.report import build_report, format_summary, read_metrics
from pipeline.evaluate.run import SampleWriter, pair_grid
from pipeline.io import tables

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
MARKER = (
    "<script>window.addEventListener('load', () => { const im = [...document.images];"
    " document.body.setAttribute('data-images-loaded',"
    " im.filter(i => i.complete && i.naturalWidth > 0).length + '/' + im.length);"
    " const v = document.getElementById('verdict'); if (v) { const r = v.getBoundingClientRect();"
    " document.body.setAttribute('data-verdict', Math.round(r.top) + '/' + Math.round(r.bottom) + '/'"
    " + window.innerHeight + '/' + window.innerWidth); }"
    " document.body.setAttribute('data-grids', [...document.querySelectorAll('img.grid')].map(g =>"
    " g.width + 'x' + g.naturalWidth + '@' + (g.closest('a') ? g.closest('a').getAttribute('href') : '')).join(' '));"
    " });</script>"
)


def images_loaded_in_chromium(html_path: Path, workdir: Path) -> tuple[int, int]:
    """(images that loaded, images on the page) for a copy of the page in headless Chromium."""
    match = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom := _chromium_dom(html_path, workdir))
    assert match, f"the page's load handler did not run; dump starts: {dom[:300]!r}"
    return int(match.group(1)), int(match.group(2))


def verdict_box_in_chromium(html_path: Path, workdir: Path) -> tuple[int, int, int, int]:
    """(top, bottom, window height, window width) of the page's #verdict in a 1280 x 800 Chromium window."""
    match = re.search(r'data-verdict="(-?\d+)/(-?\d+)/(\d+)/(\d+)"', dom := _chromium_dom(html_path, workdir))
    assert match, f"no #verdict on the page; dump starts: {dom[:300]!r}"
    return tuple(int(g) for g in match.groups())


def grids_in_chromium(html_path: Path, workdir: Path) -> list[tuple[int, int, str]]:
    """(shown width, natural width, link) of each sample grid in a 1280 px wide Chromium window."""
    match = re.search(r'data-grids="([^"]*)"', dom := _chromium_dom(html_path, workdir))
    assert match, f"the page's load handler did not run; dump starts: {dom[:300]!r}"
    return [(int(w), int(n), href) for w, n, href in re.findall(r"(\d+)x(\d+)@(\S*)", match.group(1))]


def _chromium_dom(html_path: Path, workdir: Path) -> str:
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # CI must really open the report
            pytest.fail("chromium is not installed but CI is set: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); cannot open the report")
    page = workdir / "report-check.html"
    page.write_text(html_path.read_text().replace("</body>", MARKER + "</body>"))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--virtual-time-budget=5000", "--window-size=1280,800", f"--user-data-dir={workdir / 'chromium-profile'}", "--dump-dom",
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    return dom


def rows():
    out = []
    for method, eps in (("sds-", 8.0), ("sds-", 16.0), ("advdm", 8.0), ("none", 0.0)):
        for metric, value in (("lpips_ref", 0.1 + eps / 100), ("ssim_ref", 0.9 - eps / 100)):
            out.append({"run": "r1", "group": "A", "scenario": "sdedit", "setting": "one_step/s=0.3",
                        "method": method, "eps": eps, "metric": metric, "value": value, "n_images": 2,
                        "calibrated": False, "seconds": 1.5})
    out.append({"run": "r1", "group": "A", "scenario": "visibility", "setting": "inputs", "method": "sds-",
                "eps": 8.0, "metric": "ssim", "value": math.nan, "n_images": 2, "calibrated": True, "seconds": 0.0})
    return out


def test_report_from_table_and_samples(tmp_path, photos, capsys):
    out = tmp_path / "eval"
    path = tables.write_table(rows(), "mimicry_metrics", str(out / "tables" / "mimicry_metrics"))
    tables.check_file(path, "mimicry_metrics")
    clean = photos["astronaut"][:64, :64]
    prot = np.clip(clean.astype(int) + 8, 0, 255).astype(np.uint8)
    writer = SampleWriter(str(out), None, per_group=2)
    image, info = pair_grid(clean, prot, 64, [("s=0.3", clean, prot)])
    writer.write("sdedit", "A", "key/one", image, {"key": "key/one", "method": "sds-", "eps": 8.0, **info})

    report, summary = build_report(str(out))
    assert report == str(out / "report.html")
    assert ("sdedit", "lpips_ref") in summary.index and "none (clean)" in summary.columns
    assert summary.loc[("sdedit", "lpips_ref"), "sds- eps=16"] == pytest.approx(0.26)
    text = format_summary(summary)
    assert "lpips_ref" in text and "advdm eps=8" in text
    html = Path(report).read_text()
    assert "key/one" in html and "Uncalibrated rows present" in html
    assert 'src="data:image/png;base64,' in html and 'src="http' not in html  # self-contained
    loaded, total = images_loaded_in_chromium(Path(report), tmp_path)
    assert total >= 3 and loaded == total  # the sample grid and one plot per scenario
    top, bottom, height, width = verdict_box_in_chromium(Path(report), tmp_path)
    assert width == 1280 and 0 <= top < bottom <= height  # the verdict is on the first screen, whole
    # the grid at full size (256 px a cell, 3 cells across) on a 1280 px page, linked to its PNG beside the page
    ((shown, natural, href),) = grids_in_chromium(Path(report), tmp_path)
    assert shown == natural == 3 * 258 + 2 and href.startswith("samples/sdedit/") and href.endswith(".png")
    assert Image.open(out / href).size == (natural, 3 * 258 + 2)  # the link opens the full-size PNG
    assert "the mimic sees 64 x 64 px: the shorter side resized to 64 px, then the centre square cropped" in html.replace(
        "The mimic", "the mimic")


def test_pair_grid_has_three_full_columns_and_shows_the_mimics_view(photos):
    tall = photos["astronaut"][:, 100:300]  # 512 x 200: the mimic crops the centre square of a portrait
    prot = np.clip(tall.astype(int) + 8, 0, 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    mimic_c = np.full((64, 64, 3), 40, np.uint8)
    mimic_p = rng.integers(50, 70, (64, 64, 3), dtype=np.uint8)
    outputs = [(s, mimic_c, mimic_p) for s in ("s=0.1", "s=0.3")]
    image, info = pair_grid(tall, prot, 64, outputs)
    assert image.shape == (4 * 258 + 2, 3 * 258 + 2, 3)  # inputs, the mimic's view, one row per setting
    assert info["rows"][1] == "as the mimic sees it (64 px)" and info["rows"][2:] == ["mimic output, s=0.1",
                                                                                       "mimic output, s=0.3"]
    assert info["columns"] == ["clean", "protected", "difference, amplified"] and info["mimic_resolution"] == 64
    cells = [image[2 + i * 258: 258 + i * 258, 2 + j * 258: 258 + j * 258] for i in range(4) for j in range(3)]
    assert all((cell != 255).any() for cell in cells)  # no empty (white) cell
    view = cells[3]  # the clean image as the mimic saw it: 64 px, each pixel a 4 x 4 block
    assert (view[::4, ::4] == view[1::4, 1::4]).all() and (view == np.repeat(np.repeat(view[::4, ::4], 4, 0), 4, 1)).all()
    assert (cells[6] == 40).all() and (cells[7][::4, ::4] == mimic_p).all()  # both mimics of a setting side by side


def calibrated_rows(protected: dict[str, float], clean: dict[str, float], calibrated: bool = True) -> list[dict]:
    out = []
    for method, values in (("none", clean), *((m, {"lpips_ref": v}) for m, v in protected.items())):
        for metric, value in values.items():
            out.append({"run": "r1", "group": "A", "scenario": "sdedit", "setting": "ddim100/s=0.3",
                        "method": method, "eps": 0.0 if method == "none" else 8.0, "metric": metric, "value": value,
                        "n_images": 4, "calibrated": calibrated, "seconds": 1.0})
    return out


def test_verdict_per_method_from_calibrated_figures_only(tmp_path):
    import pandas as pd

    from pipeline.evaluate.report import format_verdicts, verdicts

    # LPIPS of the mimic's output to the artist's image: clean 0.20; thresholds +0.10 protected, +0.03 weak
    df = pd.DataFrame(calibrated_rows({"mist": 0.35, "sds-": 0.25, "photoguard": 0.21}, {"lpips_ref": 0.20}))
    got = {v["method"]: v["verdict"] for v in verdicts(df)}
    assert got == {"mist": "protected", "sds-": "weak", "photoguard": "not protected"}
    assert "+0.15 LPIPS further from the artist's image than copies of the clean ones" in format_verdicts(df)

    uncal = pd.DataFrame(calibrated_rows({"mist": 0.9}, {"lpips_ref": 0.2}, calibrated=False))
    (only,) = verdicts(uncal)
    assert only["verdict"] is None and "uncalibrated" in only["words"]

    out = tmp_path / "eval"
    tables.write_table(calibrated_rows({"mist": 0.35}, {"lpips_ref": 0.20}) + calibrated_rows(
        {"mist": 0.9}, {"lpips_ref": 0.2}, calibrated=False), "mimicry_metrics", str(out / "tables" / "mimicry_metrics"))
    page = Path(build_report(str(out))[0]).read_text()
    assert page.index("id='verdict'") < page.index("Summary (calibrated figures)") < page.index("Uncalibrated figures")
    assert "<code>lpips_ref</code>: LPIPS perceptual distance" in page  # a glossary line per metric


def test_report_of_an_empty_output(tmp_path):
    report, summary = build_report(str(tmp_path / "nothing"))
    assert summary.empty and "No metric rows found" in Path(report).read_text()
    assert read_metrics(str(tmp_path / "nothing")).columns.tolist() == tables.load_schema("mimicry_metrics").names


def test_cli_report_prints_the_summary(tmp_path, capsys):
    from pipeline.cli import main

    tables.write_table(rows(), "mimicry_metrics", str(tmp_path / "tables" / "mimicry_metrics"))
    assert main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "ssim_ref" in printed and f"report: {tmp_path / 'report.html'}" in printed
