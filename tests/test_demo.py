"""`mimicshield demo`: loopback S3, sample shards with one corrupt sample, tiny model, summary."""

from __future__ import annotations

import pytest

from pipeline.cli import main

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_ends_with_a_small_evaluation(ray_local, tmp_path, monkeypatch, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, "restored-after-the-test")  # the demo points these at its own endpoint
    out = tmp_path / "demo"
    code = main(["demo", "--out-dir", str(out), "--shards", "2", "--samples", "2", "--steps", "2", "--no-progress",
                 "--evaluate", "--eval-ddim-steps", "4", "--eval-ti-steps", "6"])
    text = capsys.readouterr().out
    assert code == 0
    assert "5 samples in, 4 protected, 1 errors" in text  # one deliberately corrupt sample
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    for table in ("protect_metrics", "errors", "runs"):
        assert list((out / "tables" / table).glob("*.parquet"))
    assert "bad-corrupt" in text and str(out) in text
    # the before/after contact sheet, 4 images x (clean, protected, perturbation)
    from PIL import Image

    assert Image.open(out / "before-after.png").size == (4 * 130 + 2, 3 * 130 + 2)
    # the mimic's table, its sample grids (clean | protected | perturbation, then both mimics) and the report
    assert "mimicry (SDEdit)" in text and "psnr_pair" in text
    assert list((out / "evaluation" / "tables" / "mimicry_metrics").glob("*.parquet"))
    assert list((out / "evaluation" / "samples" / "sdedit").rglob("*.png"))
    assert (out / "evaluation" / "report.html").stat().st_size > 10_000
    assert text.rstrip().splitlines()[-1].endswith(str(out / "evaluation" / "report.html"))  # the report, last
    assert (out / "before-after.png").exists()
    # style mimicry: two style-world artists, textual inversion on clean vs protected, style rows and images
    import pyarrow.parquet as pq

    assert "style mimicry (textual inversion)" in text
    style = out / "style-evaluation"
    metrics = pq.read_table(style / "tables" / "mimicry_metrics").to_pylist()
    rows = [r for r in metrics if r["metric"] == "style_accuracy"]
    assert {r["group"] for r in rows} == {"oskses", "ragarka"}  # the style world's first held-out artists
    assert len(list((style / "generated").rglob("*.png"))) == 2 * 2 * 8  # artists x (clean, protected) x 8
    assert (style / "report.html").exists()
