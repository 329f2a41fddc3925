"""`mimicshield study`: the grid as data, damage signs, and a study end to end over moto S3 with a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from pipeline.io import tables
from pipeline.study.grid import CLEAN, StudyGrid
from pipeline.study.workers import damage

REPO = Path(__file__).resolve().parents[1]


def test_grid_cells_are_unique_and_baselines_first():
    grid = StudyGrid(methods=("sds-", "photoguard+eot"), eps=(4, 8), purifications=("none", "jpeg:75", "noise"),
                     scenarios=("sdedit", "lora"))
    cells = grid.cells()
    assert len(cells) == (1 + 2 * 2) * 3 * 2 and len({c.id for c in cells}) == len(cells)
    assert all(c.source == CLEAN for c in cells[: 3 * 2])  # the clean baseline cells come first
    assert grid.purifications == ("none", "jpeg:75", "noise:0.05")  # normalised specs
    assert {s.id for s in grid.protections} == {"sds-_eps4", "sds-_eps8", "photoguard+eot_eps4", "photoguard+eot_eps8"}
    assert [s.eot for s in grid.protections] == [False, False, True, True]


@pytest.mark.parametrize("kwargs,reason", [
    (dict(methods=("nope",)), "unknown method"), (dict(purifications=("blur:-1",)), "sigma"),
    (dict(scenarios=("nope",)), "unknown scenario"), (dict(eps=(0,)), "eps"), (dict(eps=(4, 4)), "twice"),
])
def test_grid_refuses_bad_input(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        StudyGrid(**kwargs)


def test_damage_is_positive_when_the_protection_hurts_the_mimic():
    assert damage("psnr_ref", 20.0, 25.0) == 5.0  # similarity: lower than the baseline
    assert damage("lpips_ref", 0.5, 0.2) == pytest.approx(0.3)  # distance: higher than the baseline
    assert damage("kid", 0.1, 0.3) == pytest.approx(-0.2)
    assert damage("ssim_ref", 0.5, None) is None


def robustness_rows(damage: dict) -> pd.DataFrame:
    """A robustness table: {(method, purification): headline damage} for sdedit (PSNR), plus the clean baseline."""
    rows = [{"method": m, "eps": 8.0, "purification": p, "purification_name": p.split(":")[0],
             "strength": 0.0, "scenario": "sdedit", "metric": "psnr_ref", "damage": d, "calibrated": False}
            for (m, p), d in damage.items()]
    rows += [{**rows[0], "method": "none", "eps": 0.0, "damage": 0.0}]
    return pd.DataFrame(rows)


def test_study_verdict_says_which_protection_survives_which_purification():
    from pipeline.study.report import format_survival, survival

    df = robustness_rows({("sds-", "none"): 4.0, ("sds-", "jpeg:50"): 3.2, ("sds-", "noise:0.1"): 0.4,
                          ("mist", "none"): 2.0, ("mist", "jpeg:50"): 1.0, ("advdm", "none"): -0.5,
                          ("advdm", "jpeg:50"): 0.1})
    got = {(v["method"], v["purification"]): v["verdict"] for v in survival(df)}
    assert got == {("sds-", "jpeg:50"): "survives", ("sds-", "noise:0.1"): "removed",
                   ("mist", "jpeg:50"): "weakened", ("advdm", "jpeg:50"): None}  # advdm did no damage unpurified
    text = format_survival(df)
    assert "sdedit, jpeg:50: sds- eps=8: SURVIVES: keeps 80% of its damage (psnr_ref damage +3.2 after jpeg:50, " \
           "+4 unpurified)" in text
    assert "advdm eps=8: NO VERDICT: the protection does no damage to the mimic even unpurified" in text
    assert text.splitlines()[-1].startswith("  (uncalibrated")


def test_study_says_which_protection_survives_each_adaptive_attack():
    """The adaptive attacks (cat, gridpure, pdmpure, diffpure) get one sentence each, per mimic, aspl and
    dreambooth included; the other purifications only their per-protection lines."""
    from pipeline.study.report import adaptive_summary, format_survival

    df = robustness_rows({("aspl", "none"): 0.5, ("aspl", "gridpure:0.01"): 0.45, ("aspl", "cat:100"): 0.05,
                          ("sds-", "none"): 0.5, ("sds-", "gridpure:0.01"): 0.2, ("sds-", "cat:100"): 0.4,
                          ("sds-", "jpeg:75"): 0.5, ("aspl", "pdmpure:0.1"): 0.1})
    df = df.assign(scenario="dreambooth", metric="style_accuracy")
    lines = adaptive_summary(df)
    assert lines == ["against cat:100 (dreambooth mimic): survives sds- eps=8; removed aspl eps=8",
                     "against gridpure:0.01 (dreambooth mimic): survives aspl eps=8; weakened sds- eps=8",
                     "against pdmpure:0.1 (dreambooth mimic): removed aspl eps=8"]
    assert format_survival(df).splitlines()[0] == f"  {lines[0]}"


def test_no_verdict_on_a_damage_too_small_to_judge():
    """Style accuracy moves in steps of one generated image: a protection whose unpurified damage is one image
    of the 16 behind it gets no verdict; two images do. An SDEdit damage under 0.1 dB gets none either."""
    from pipeline.study.report import adaptive_summary, survival

    df = robustness_rows({("sds-", "none"): 1 / 16, ("sds-", "cat:100"): 0.0,
                          ("aspl", "none"): 2 / 16, ("aspl", "cat:100"): 0.0})
    df = df.assign(scenario="lora", metric="style_accuracy", n_images=16)
    words = {v["method"]: (v["verdict"], v["words"]) for v in survival(df)}
    assert words["sds-"] == (None, "its unpurified damage (style_accuracy +0.0625) is one generated image of 16 or "
                                   "less: too few to judge")
    assert words["aspl"][0] == "removed"
    assert adaptive_summary(df) == ["against cat:100 (lora mimic): removed aspl eps=8; no verdict sds- eps=8"]
    sdedit = robustness_rows({("mist", "none"): 0.05, ("mist", "jpeg:75"): -0.2})  # under 0.1 dB: invisible
    assert [v["verdict"] for v in survival(sdedit)] == [None]
    assert "under 0.1 dB: too small to judge" in survival(sdedit)[0]["words"]


def test_default_grid_has_anti_dreambooth_and_its_mimic():
    grid = StudyGrid()
    assert "aspl" in grid.methods and "dreambooth" in grid.scenarios
    assert {"gridpure", "pdmpure", "cat"} <= {p.split(":")[0] for p in grid.purifications}


def test_the_plan_line_counts_the_cells_and_names_the_mimics_that_train():
    from pipeline.study.run import plan_line

    grid = StudyGrid(methods=("sds-", "aspl"), eps=(8.0, 16.0), purifications=("none", "jpeg:75", "blur:1"),
                     scenarios=("sdedit", "dreambooth"))
    line = plan_line(grid)
    assert line.startswith("study: 30 cells = 5 image sets") and "dreambooth train a model per cell" in line
    assert "train" not in plan_line(StudyGrid(methods=("sds-",), eps=(8.0,), purifications=("none",),
                                              scenarios=("sdedit",)))


def test_study_heatmap_writes_each_cells_value():
    from pipeline.study.report import heatmap_figure, retained_matrix

    df = robustness_rows({("sds-", "none"): 4.0, ("sds-", "jpeg:50"): 3.2, ("mist", "none"): 2.0})
    matrix = retained_matrix(df, "sdedit")
    fig = heatmap_figure(matrix, "sdedit")
    written = sorted(t.get_text() for t in fig.axes[0].texts)
    assert written == sorted(["1.00", "0.80", "1.00", "-"])  # mist under jpeg:50 was not computed
    assert matrix.shape == (2, 2)


def test_training_cells_are_judged_by_the_style_score_when_they_have_it():
    """lora cells: style accuracy is their headline (falling accuracy = damage), style distance without it,
    CLIP similarity only for tables written before the style score."""
    from pipeline.study.report import headline_metrics, retained_matrix

    assert damage("style_accuracy", 0.25, 0.75) == 0.5 and damage("style_distance", 6.0, 5.0) == 1.0
    rows = []
    for metric, protected, baseline in (("style_accuracy", {"none": 0.25, "jpeg:50": 0.5}, 0.75),
                                        ("style_distance", {"none": 6.0, "jpeg:50": 5.0}, 5.0),
                                        ("clip_i2i_ref", {"none": 70.0, "jpeg:50": 80.0}, 80.0)):
        for p, value in protected.items():
            rows.append({"method": "sds-", "eps": 16.0, "purification": p, "purification_name": p.split(":")[0],
                         "strength": 0.0, "scenario": "lora", "metric": metric, "calibrated": False,
                         "damage": damage(metric, value, baseline)})
        rows.append({**rows[-1], "method": "none", "eps": 0.0, "damage": 0.0})
    df = pd.DataFrame(rows)
    assert headline_metrics(df)["lora"] == "style_accuracy"
    row = retained_matrix(df, "lora").iloc[0]  # accuracy damage 0.5 unpurified, 0.25 after jpeg:50
    assert row["none"] == pytest.approx(1.0) and row["jpeg:50"] == pytest.approx(0.5)
    assert headline_metrics(df[df["metric"] != "style_accuracy"])["lora"] == "style_distance"
    assert headline_metrics(df[~df["metric"].str.startswith("style")])["lora"] == "clip_i2i_ref"


# ---------------------------------------------------------------------------- end to end


METHODS, EPS, PURIFICATIONS = ("sds-",), (8.0,), ("none", "jpeg:50", "cat:2")  # a data-side and a model-side attack
CELLS = (1 + len(METHODS) * len(EPS)) * len(PURIFICATIONS)  # the clean baseline + 1 protection, x 3, x sdedit


def study_command(clean: str, output: str) -> list[str]:
    return ["study", clean, output, "--model", "tiny", "--device", "cpu", "--methods", ",".join(METHODS),
            "--eps", ",".join(f"{e:g}" for e in EPS), "--purifications", ",".join(PURIFICATIONS),
            "--scenarios", "sdedit", "--steps", "2", "--step-size", "2", "--strengths", "0.3",
            "--sdedit-modes", "one_step", "--samples", "1", "--no-progress"]


@pytest.mark.slow
def test_study_over_s3_survives_a_kill(s3_server, s3_bucket, ray_local):
    from pipeline.cli import main
    from pipeline.io.sample_data import photo_samples, shard_bytes

    s3 = boto3.client("s3", **s3_server)
    samples = photo_samples(3, sizes=((64, 64),))
    s3.put_object(Bucket=s3_bucket, Key="clean/shard-000000.tar", Body=shard_bytes(samples))
    clean, output = f"s3://{s3_bucket}/clean/", f"s3://{s3_bucket}/study"
    env = {**os.environ, "MIMICSHIELD_FAULT": "cells-committed:3", "PYTHONPATH": str(REPO)}
    # first run: SIGKILLed by itself after 3 committed cells (no cleanup of any kind runs)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *study_command(clean, output)], env=env,
                            cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        log, _ = proc.communicate(timeout=900)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the Ray processes it started
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, log.decode()[-3000:]
    fs = pafs.S3FileSystem(endpoint_override=s3_server["endpoint_url"], access_key="testing",
                           secret_key="testing", region="us-east-1")
    table_dir = f"{s3_bucket}/study/tables/robustness"

    def cell_files():
        infos = fs.get_file_info(pafs.FileSelector(table_dir, allow_not_found=True))
        return sorted(i.path for i in infos if i.path.endswith(".parquet") and "/_" not in i.path)

    first = cell_files()
    assert 3 <= len(first) < CELLS
    before = {p: fs.get_file_info(p).mtime for p in first}
    # rerun the same command: only the missing cells are computed
    assert main(study_command(clean, output)) == 0
    files = cell_files()
    assert len(files) == CELLS
    assert {p: fs.get_file_info(p).mtime for p in first} == before  # committed cells were not redone
    rows = []
    for path in files:
        tables.check_file(path, "robustness", filesystem=fs)
        rows += pq.read_table(path, filesystem=fs).to_pylist()
    cells = {(r["method"], r["eps"], r["purification"], r["scenario"]) for r in rows}
    expected = {("none", 0.0, p, "sdedit") for p in PURIFICATIONS} | {
        (m, e, p, "sdedit") for m in METHODS for e in EPS for p in PURIFICATIONS}
    assert cells == expected
    per_cell = {}
    for r in rows:  # every (cell, setting, metric) exactly once
        k = (r["method"], r["eps"], r["purification"], r["setting"], r["metric"])
        per_cell[k] = per_cell.get(k, 0) + 1
    assert set(per_cell.values()) == {1}
    assert {r["metric"] for r in rows} >= {"psnr_ref", "ssim_ref", "lpips_ref"}
    for r in rows:
        assert r["n_images"] == 3 and r["baseline"] is not None and r["damage"] is not None
        if r["method"] == "none":
            assert r["damage"] == 0 and r["baseline"] == r["value"]
        else:
            base = next(b for b in rows if b["method"] == "none" and b["purification"] == r["purification"]
                        and b["setting"] == r["setting"] and b["metric"] == r["metric"])
            assert r["baseline"] == base["value"]
    # protected once per (method, eps), purified sets and the report are there
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="study/")
            for o in page.get("Contents", [])}
    assert {f"study/protected/{m}_eps{e:g}/shard-000000.tar" for m in METHODS for e in EPS} <= keys
    assert len([k for k in keys if k.startswith("study/purified/") and k.endswith(".tar")]) == CELLS
    assert "study/adapters/cat-2.safetensors" in keys  # the model-side attack's adapters, trained once
    assert "study/report.html" in keys and not [k for k in keys if "/_tmp-" in k]
    report = s3.get_object(Bucket=s3_bucket, Key="study/report.html")["Body"].read().decode()
    assert "protection retained" in report.lower() and report.count("data:image/png") >= 3  # heatmap, curves, samples


def test_save_images_writes_every_image_a_training_cell_generated(tmp_path):
    """`study --save-images`: all of a training cell's generated images, with the prompt and seed that made each
    and the cell's protection and purification (evaluate's writer, so both tools' index.json read alike)."""
    import json
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from pipeline.cli import build_parser
    from pipeline.commands.study import settings_from_args
    from pipeline.evaluate.mimic import LoraConfig
    from pipeline.evaluate.mimic.common import MimicOutput, mimic_seed
    from pipeline.study import adapter
    from pipeline.study.grid import Cell, Source
    from pipeline.study.store import StudyStore

    argv = ["study", str(tmp_path / "clean"), str(tmp_path / "out"), "--save-images"]
    args = build_parser().parse_args(argv)
    args._argv = argv[1:]
    assert settings_from_args(args).evaluation.save_images  # accepted and passed on, not dropped

    store = StudyStore(str(tmp_path / "out"))
    cell = Cell(Source("sds-", 8.0), "jpeg:50", "lora")
    images = [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(5)]
    out = MimicOutput("lora", "rank=4/steps=2", "protected", [f"ana/{i}" for i in range(5)], images)
    adapter.save_generated(store, cell, "ana", out, SimpleNamespace(config=LoraConfig(seed=3)))
    folder = tmp_path / "out" / "generated" / "lora" / cell.id
    index = json.loads((folder / "index.json").read_text())
    assert [e["file"] for e in index] == [f"{i}.png" for i in range(5)]
    assert all((e["method"], e["eps"], e["purification"], e["group"]) == ("sds-", 8.0, "jpeg:50", "ana") for e in index)
    assert index[0]["prompt"] == "a painting in the style of sks"
    assert [e["seed"] for e in index] == [mimic_seed(3, f"lora/ana/{i}") for i in range(5)]
    assert np.array_equal(np.asarray(Image.open(folder / "4.png")), images[4])


def test_a_rerun_with_other_settings_is_refused_in_one_line_and_overwrite_recomputes_everything(tmp_path, capsys):
    """study.json records the settings' fingerprint: cells made with --strengths 0.3 are never mixed with 0.7 ones;
    a wider grid is not "other settings" (its new cells are added); --overwrite clears cells, purified sets and
    adapters. The refusal comes before Ray starts, as protect's does."""
    import json

    import numpy as np

    from pipeline.cli import build_parser, main
    from pipeline.commands.study import settings_from_args
    from pipeline.io.sample_data import png_bytes
    from pipeline.study.grid import Cell
    from pipeline.study.run import check_same_settings
    from pipeline.study.store import StudyStore

    clean, output = tmp_path / "clean", tmp_path / "study"
    clean.mkdir()
    (clean / "a.png").write_bytes(png_bytes(np.full((32, 32, 3), 128, np.uint8)))
    command = study_command(str(clean), str(output))

    def settings(*changed):
        return settings_from_args(build_parser().parse_args([*command, *changed]))

    # what an earlier run with these options committed: a cell, a purified set, the adapters, study.json
    first = settings()
    store = StudyStore(str(output))
    cell = Cell(CLEAN, "none", "sdedit")
    store.write_cell(cell, [])
    store.write_atomic(f"{store.root}/purified/jpeg-50/none.tar", b"")
    store.write_atomic(f"{store.root}/adapters/cat-2.safetensors", b"")
    store.write_atomic(f"{store.root}/study.json", json.dumps({"fingerprint": first.fingerprint()}).encode())
    check_same_settings(settings(), store)  # the same command resumes
    check_same_settings(settings("--methods", "sds-,photoguard", "--eps", "8,16"), store)  # a wider grid adds cells

    for changed, said in ((["--strengths", "0.7"], "evaluation.sdedit.strengths: [0.3] -> [0.7]"),
                          (["--steps", "3"], "steps: 2 -> 3")):
        assert main([*command, *changed]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "holds a study made with other settings" in err and said in err, err
        assert "--overwrite" in err
    assert store.exists(store.cell_path(cell))  # refused: nothing touched

    check_same_settings(settings("--strengths", "0.7", "--overwrite"), store)
    assert not store.has_work() and not store.exists(store.cell_path(cell))


def test_max_pixels_reaches_the_studys_decoding(tmp_path):
    """An image over --max-pixels is an error row of protect; the study's purified sets and cells leave it out
    (before, the study decoded it anyway, whatever --max-pixels said)."""
    import numpy as np

    from pipeline.cli import build_parser
    from pipeline.commands.study import settings_from_args
    from pipeline.io.sample_data import png_bytes
    from pipeline.study.store import StudyStore
    from pipeline.study.workers import purify_set

    (tmp_path / "clean").mkdir()
    argv = [*study_command(str(tmp_path / "clean"), str(tmp_path / "study")), "--max-pixels", "4096"]
    settings = settings_from_args(build_parser().parse_args(argv))
    encoded = {"small": (png_bytes(np.full((32, 32, 3), 90, np.uint8)), None, None),
               "large": (png_bytes(np.full((96, 96, 3), 90, np.uint8)), None, None)}  # 9216 pixels > 4096
    assert purify_set(settings, CLEAN, "jpeg:50", encoded)["images"] == 1
    assert sorted(StudyStore(settings.output).read_purified(CLEAN, "jpeg:50")) == ["small"]
