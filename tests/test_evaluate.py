"""The evaluation stage: every scenario end to end on a small group, in-process and through Ray + S3."""

from __future__ import annotations

import json

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from pipeline.evaluate.mimic import (
    InpaintConfig,
    LoraConfig,
    SDEditConfig,
    TextualInversionConfig,
)
from pipeline.evaluate.run import GroupTrainer, PairEvaluator, annotate
from pipeline.evaluate.settings import EvalSettings
from pipeline.io import tables
from pipeline.io.sample_data import photo_samples, png_bytes, shard_bytes
from pipeline.metrics.mimicry import MetricConfig
from pipeline.models.loading import ModelSpec

pytestmark = pytest.mark.slow

FAST_CONFIGS = dict(
    sdedit=SDEditConfig(strengths=(0.5,), ddim_steps=2),
    inpaint=InpaintConfig(masks=("meta", "center"), steps=2),
    textual_inversion=TextualInversionConfig(steps=2, num_images=2, inference_steps=2),
    lora=LoraConfig(rank=2, steps=2, num_images=2, inference_steps=2),
    metrics=MetricConfig(device="cpu"),
)
FAST_ARGS = ["--model", "tiny", "--device", "cpu", "--strengths", "0.5", "--ddim-steps", "2", "--masks", "center",
             "--inpaint-steps", "2", "--ti-steps", "2", "--lora-steps", "2", "--lora-rank", "2", "--num-images", "2",
             "--inference-steps", "2", "--samples-per-group", "1"]


def perturbed(png: bytes, eps: int, seed: int) -> bytes:
    """A stand-in protected copy (a random +-eps sign pattern): the evaluation only sees pixels."""
    from pipeline.io.images import decode_image

    rgb = decode_image(png).rgb.astype(int)
    sign = np.random.default_rng(seed).choice([-eps, eps], rgb.shape)
    return png_bytes(np.clip(rgb + sign, 0, 255).astype(np.uint8))


def test_every_scenario_writes_schema_rows(tmp_path):
    samples = photo_samples(2, prefix="a")
    batch = pa.Table.from_pylist([
        {"key": s["__key__"], "p_image": perturbed(s["png"], 8, i), "c_image": s["png"],
         "p_meta": json.dumps({"artist": "A", "mask": [0, 0, 32, 32],
                               "mimicshield": {"method": "sds-", "eps": 8, "run_id": "r1"}}),
         "c_meta": s["json"].decode()}
        for i, s in enumerate(samples)
    ])
    settings = EvalSettings(protected="prot", clean="clean", output=str(tmp_path), model=ModelSpec("tiny", device="cpu"),
                            **FAST_CONFIGS)
    joined = annotate(batch, settings)
    assert joined.column("group").to_pylist() == ["A", "A"] and joined.column("eps").to_pylist() == [8.0, 8.0]

    rows = PairEvaluator(settings)(joined).to_pylist() + GroupTrainer(settings)(joined).to_pylist()
    path = tables.write_table(rows, "mimicry_metrics", str(tmp_path / "tables" / "mimicry_metrics"))
    tables.check_file(path, "mimicry_metrics")

    by = {}
    for r in rows:
        by.setdefault(r["scenario"], set()).add((r["setting"], r["method"], r["metric"]))
    assert set(by) == {"visibility", "sdedit", "inpaint", "textual_inversion", "lora"}
    assert {s for s, _, _ in by["sdedit"]} == {"one_step/s=0.5", "ddim2/s=0.5"}
    assert {s for s, _, _ in by["inpaint"]} == {"meta", "center"}
    for scenario in ("sdedit", "inpaint", "textual_inversion", "lora"):
        metrics = {(m, metric) for _, m, metric in by[scenario]}
        assert ("sds-", "lpips_pair") in metrics and ("none", "clip_i2i_ref") in metrics
    assert {("none", "kid"), ("sds-", "kid"), ("sds-", "clip_score")} <= {(m, x) for _, m, x in by["lora"]}
    assert all(r["run"] == "r1" and not r["calibrated"] for r in rows if r["scenario"] != "visibility")
    vis = {r["metric"]: r["value"] for r in rows if r["scenario"] == "visibility"}
    assert 20 < vis["psnr"] < 40 and vis["ssim"] < 1 and vis["lpips"] > 0
    # trained mimics and sample grids are kept
    assert (tmp_path / "mimics/lora/r1/a/protected/pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "mimics/textual_inversion/r1/a/clean/learned_embeds.safetensors").exists()
    assert len(list((tmp_path / "samples").rglob("*.png"))) >= 4


def test_ray_evaluation_over_s3_then_report(ray_local, s3_server, s3_bucket, tmp_path, capsys):
    from test_report import images_loaded_in_chromium

    from jobs.evaluate import main as evaluate_job
    from pipeline.cli import main

    client = boto3.client("s3", **s3_server)
    samples = photo_samples(4, prefix="s")
    for i, s in enumerate(samples):  # two artists, two images each
        s["json"] = json.dumps({**json.loads(s["json"]), "artist": "A" if i < 2 else "B"}).encode()
    client.put_object(Bucket=s3_bucket, Key="clean/shard-000000.tar", Body=shard_bytes(samples))

    code = main(["protect", f"s3://{s3_bucket}/clean/", f"s3://{s3_bucket}/prot/", "--model", "tiny", "--steps", "2",
                 "--eps", "8", "--step-size", "2", "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    # through the Ray job entry point, with a config file (as `ray job submit` would run it)
    config = tmp_path / "evaluate.json"
    config.write_text(json.dumps({"protected": f"s3://{s3_bucket}/prot/", "clean": f"s3://{s3_bucket}/clean/",
                                  "output": f"s3://{s3_bucket}/eval/",
                                  "scenario": ["sdedit", "inpaint", "textual_inversion", "lora"]}))
    code = evaluate_job(["--config", str(config), "--no-report", *FAST_ARGS])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "testing" not in out.out + out.err  # credentials never printed

    s3 = pafs.S3FileSystem(endpoint_override=s3_server["endpoint_url"].split("//")[1], scheme="http",
                           region="us-east-1", access_key="testing", secret_key="testing")
    files = [f.path for f in s3.get_file_info(pafs.FileSelector(f"{s3_bucket}/eval/tables/mimicry_metrics"))]
    assert len(files) == 1
    tables.check_file(files[0], "mimicry_metrics", filesystem=s3)
    rows = pq.read_table(files[0], filesystem=s3).to_pylist()
    assert {r["group"] for r in rows} == {"A", "B"}
    assert {r["scenario"] for r in rows} == {"visibility", "sdedit", "inpaint", "textual_inversion", "lora"}
    assert {(r["method"], r["eps"]) for r in rows} == {("sds-", 8.0), ("none", 0.0)}
    vis = [r for r in rows if r["scenario"] == "visibility" and r["metric"] == "psnr"]
    assert len(vis) == 2 and all(r["n_images"] == 2 for r in vis)  # per-image rows averaged per group
    sd = [r for r in rows if r["scenario"] == "sdedit" and r["metric"] == "lpips_pair"]
    assert {r["setting"] for r in sd} == {"one_step/s=0.5", "ddim2/s=0.5"}
    assert all(r["n_images"] == 2 for r in sd)
    lora = [r for r in rows if r["scenario"] == "lora" and r["metric"] == "kid"]
    assert len(lora) == 4 and all(r["n_images"] == 2 for r in lora)  # 2 groups x (protected, clean)

    assert main(["report", f"s3://{s3_bucket}/eval/"]) == 0
    printed = capsys.readouterr().out
    assert "lpips_pair" in printed and "sds- eps=8" in printed
    page = tmp_path / "report.html"
    page.write_bytes(client.get_object(Bucket=s3_bucket, Key="eval/report.html")["Body"].read())
    loaded, total = images_loaded_in_chromium(page, tmp_path)
    assert total >= 6 and loaded == total


def test_cli_refuses_unknown_scenario(capsys, tmp_path):
    import numpy as np

    from pipeline.cli import main
    from pipeline.io.sample_data import png_bytes

    prot, clean, out = (str(tmp_path / name) for name in ("prot", "clean", "out"))
    for folder in (prot, clean):  # real folders: the path checks come first
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.png").write_bytes(png_bytes(np.zeros((16, 16, 3), np.uint8)))
    assert main(["evaluate", prot, "--clean", clean, "--output", out, "--scenario", "sdedit,nope"]) == 2
    assert "unknown scenario(s) ['nope']" in capsys.readouterr().err
    # a model that cannot be loaded stops the run on the driver, with a clear message
    assert main(["evaluate", prot, "--clean", clean, "--output", out, "--model", "/no/such/model"]) == 2
    assert "unknown model '/no/such/model'" in capsys.readouterr().err


def test_inputs_grid_when_only_training_scenarios(tmp_path, photos):
    from pipeline.io.sample_data import png_bytes

    clean = png_bytes(photos["coffee"][:64, :64])
    batch = pa.Table.from_pylist([{"key": "k", "p_image": perturbed(clean, 8, 0), "c_image": clean,
                                   "p_meta": None, "c_meta": None}])
    settings = EvalSettings(protected="prot", clean="clean", output=str(tmp_path), model=ModelSpec("tiny", device="cpu"),
                            method="mist", eps=8, scenarios=("lora",), **FAST_CONFIGS)
    rows = PairEvaluator(settings)(annotate(batch, settings)).to_pylist()
    assert {(r["scenario"], r["group"], r["method"]) for r in rows} == {("visibility", "all", "mist")}
    assert (tmp_path / "samples/visibility/all/k.png").exists()


def test_no_matching_keys_is_an_error(ray_local, tmp_path, photos, capsys):
    from pipeline.cli import main

    for folder, name in (("prot", "x.png"), ("clean", "y.png")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(png_bytes(photos["coffee"][:64, :64]))
    code = main(["evaluate", str(tmp_path / "prot"), "--clean", str(tmp_path / "clean"), "--output",
                 str(tmp_path / "out"), "--model", "tiny", "--scenario", "sdedit", "--device", "cpu"])
    assert code == 2
    assert "has a clean original with the same key" in capsys.readouterr().err


def test_folder_outputs_take_method_and_eps_from_the_protect_runs_table(tmp_path):
    """Folder outputs carry no per-sample metadata: method/eps come from tables/runs when runs agree."""
    import json
    from datetime import datetime, timezone

    import pyarrow as pa

    from pipeline.evaluate.run import protection_from_runs
    from pipeline.evaluate.settings import EvalSettings
    from pipeline.io.tables import load_schema, write_table

    def filler(field):  # a value for each required column this test does not care about
        if pa.types.is_timestamp(field.type):
            return datetime.now(timezone.utc)
        return {pa.string(): "", pa.int64(): 0, pa.float64(): 0.0, pa.bool_(): False}.get(field.type)

    required = {f.name: filler(f) for f in load_schema("runs") if not f.nullable}

    def run_row(run_id, status, method, eps):
        return {**required, "run_id": run_id, "status": status, "method": method,
                "config": json.dumps({"protect": {"method": method, "eps": eps}})}

    settings = EvalSettings(protected=str(tmp_path), clean=str(tmp_path), output=str(tmp_path / "eval"))
    assert protection_from_runs(settings) == (None, None)  # no runs table
    runs = str(tmp_path / "tables" / "runs")
    write_table([run_row("a", "failed", "advdm", 4.0), run_row("b", "completed", "sds-", 8.0)], "runs", runs)
    assert protection_from_runs(settings) == ("sds-", 8.0)  # failed runs don't count
    write_table([run_row("c", "completed", "photoguard", 8.0)], "runs", runs)
    assert protection_from_runs(settings) == (None, None)  # runs disagree: leave it to --method/--eps


def test_training_mimics_write_style_rows_and_their_generated_images(tmp_path):
    """Style accuracy/distance rows for the clean and protected mimic; --save-images writes every generated
    image with the prompt and seed that made it, the clean and protected sets paired by index."""
    from pipeline.data.styles import HELD_OUT_STYLES, artist_images
    from pipeline.evaluate.run import png

    artist, other = HELD_OUT_STYLES[0], HELD_OUT_STYLES[1]
    clean = [png_bytes(img) for img in artist_images(artist, 2, 64, seed=3)]
    batch = pa.Table.from_pylist([
        {"key": f"k{i}", "p_image": perturbed(c, 8, i), "c_image": c,
         "p_meta": json.dumps({"artist": artist.name, "mimicshield": {"method": "sds-", "eps": 8, "run_id": "r1"}}),
         "c_meta": "{}"} for i, c in enumerate(clean)])
    settings = EvalSettings(protected="prot", clean="clean", output=str(tmp_path), model=ModelSpec("tiny", device="cpu"),
                            scenarios=("lora", "textual_inversion"), save_images=True, **FAST_CONFIGS)
    references = {artist.name: clean, other.name: [png(img) for img in artist_images(other, 2, 64, seed=4)]}
    rows = GroupTrainer(settings, style_references=references)(annotate(batch, settings)).to_pylist()
    path = tables.write_table(rows, "mimicry_metrics", str(tmp_path / "tables" / "mimicry_metrics"))
    tables.check_file(path, "mimicry_metrics")
    style = {(r["scenario"], r["method"], r["metric"]): r for r in rows if r["metric"].startswith("style_")}
    for scenario in ("lora", "textual_inversion"):
        for method in ("sds-", "none"):
            assert 0 <= style[(scenario, method, "style_accuracy")]["value"] <= 1
            assert style[(scenario, method, "style_distance")]["value"] > 0
            assert style[(scenario, method, "style_accuracy")]["n_images"] == 2
    assert not any(r["calibrated"] for r in style.values())  # a random style backbone
    for scenario in ("lora", "textual_inversion"):
        base = tmp_path / "generated" / scenario / "r1" / artist.name
        prot, cln = base / "sds-8" / "protected", base / "none-0" / "clean"
        index_p, index_c = (json.loads((d / "index.json").read_text()) for d in (prot, cln))
        assert [e["file"] for e in index_p] == ["0.png", "1.png"] and all((prot / e["file"]).is_file() for e in index_p)
        assert [(e["prompt"], e["seed"]) for e in index_p] == [(e["prompt"], e["seed"]) for e in index_c]
        assert len({e["seed"] for e in index_p}) == 2 and index_p[0]["method"] == "sds-" and index_c[0]["eps"] == 0.0
