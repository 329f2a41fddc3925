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

from pipeline.evaluate.report import build_report, format_summary, read_metrics
from pipeline.evaluate.run import SampleWriter, amplified_perturbation, grid
from pipeline.io import tables

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
MARKER = (
    "<script>window.addEventListener('load', () => { const im = [...document.images];"
    " document.body.setAttribute('data-images-loaded',"
    " im.filter(i => i.complete && i.naturalWidth > 0).length + '/' + im.length); });</script>"
)


def images_loaded_in_chromium(html_path: Path, workdir: Path) -> tuple[int, int]:
    """(images that loaded, images on the page) for a copy of the page in headless Chromium."""
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # CI must really open the report
            pytest.fail("chromium is not installed but CI is set: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); cannot open the report")
    page = workdir / "report-check.html"
    page.write_text(html_path.read_text().replace("</body>", MARKER + "</body>"))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--virtual-time-budget=5000", f"--user-data-dir={workdir / 'chromium-profile'}", "--dump-dom",
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    match = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert match, f"the page's load handler did not run; dump starts: {dom[:300]!r}"
    return int(match.group(1)), int(match.group(2))


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
    writer.write("sdedit", "A", "key/one", grid([[clean, prot, amplified_perturbation(clean, prot)], [clean], [prot]]),
                 {"key": "key/one", "method": "sds-", "eps": 8.0, "rows": ["inputs"], "columns": ["s=0.3"]})

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
