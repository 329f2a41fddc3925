"""Robustness-study benchmarks on CPU with the built-in tiny model.

    python -m benchmarks.bench_study cells     # seconds per purification (per image) and per cell
    python -m benchmarks.bench_study scaling   # the mimic phase with 1, 2, 4 Ray workers (Cluster simulation)
    python -m benchmarks.bench_study table     # protection retained, default grid (+ sds-+eot), held-out photos
    python -m benchmarks.bench_study eot       # photoguard vs photoguard+eot at eps 16 under jpeg/resize/noise
    python -m benchmarks.bench_study style --artist 0   # issue 22's grid on one held-out artist of the style world
    python -m benchmarks.bench_study style-table        # pool the artists' studies: study_style.json and .md

Held-out photos: crops of scikit-image's bundled photos the tiny model never saw in training
(`pipeline.data.photos.HELD_OUT`: rocket, motorcycle), at 64 x 64.
Results go to benchmarks/results/study_<part>.json (and the table study's report.html path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.io.images import from_batch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MIMICSHIELD_CACHE", str(ROOT / ".cache" / "mimicshield"))
RESULTS = ROOT / "benchmarks" / "results"

from benchmarks.results_writer import machine_lines, write_results  # noqa: E402


def held_out_photos(n: int, size: int = 64) -> dict[str, np.ndarray]:
    """n images at size x size from the photos tiny never saw in training (data.photos.HELD_OUT)."""
    from pipeline.data.photos import HELD_OUT, held_out_images

    per_photo = max(0, -(-n // len(HELD_OUT)) - 1)  # the centre square of each photo, then random crops
    x = held_out_images(size, per_photo)
    names = [f"{name}-{j}" for name in HELD_OUT for j in range(per_photo + 1)]
    images = from_batch(x)
    return dict(list(zip(names, images))[:n])


def write_folder(photos: dict[str, np.ndarray], folder: Path) -> str:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for key, rgb in photos.items():  # a key may hold folders (artist/0)
        (folder / f"{key}.png").parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / f"{key}.png")
    return str(folder)


def study_args(clean: str, output: str, methods, eps, purifications, extra=()) -> list[str]:
    return ["study", clean, output, "--model", "tiny", "--device", "cpu", "--methods", ",".join(methods),
            "--eps", ",".join(str(e) for e in eps), "--purifications", ",".join(purifications),
            "--scenarios", "sdedit", "--no-progress", *extra]


def bench_cells(args) -> dict:
    """Seconds per image of each purification, and per-cell seconds of the mimic, tiny at 64 px."""
    from pipeline.study.grid import DEFAULT_PURIFICATIONS
    from pipeline.study.purify import PurifyContext, parse_purification

    photos = held_out_photos(args.images)
    keys, images = list(photos), list(photos.values())
    context = PurifyContext(model="tiny", device="cpu", dtype="fp32")
    purify = {}
    for spec in DEFAULT_PURIFICATIONS:
        unit = parse_purification(spec)
        unit.apply(images[:1], keys[:1], context=context)  # load models once
        t = time.perf_counter()
        unit.apply(images, keys, context=context)
        purify[spec] = (time.perf_counter() - t) / len(images)
    from pipeline.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        clean = write_folder(photos, Path(tmp) / "clean")
        out = str(Path(tmp) / "study")
        t = time.perf_counter()
        main(study_args(clean, out, ["sds-"], [8], ["none", "jpeg:75", "noise:0.05"],
                        ["--steps", str(args.steps), "--ddim-steps", "20"]))
        total = time.perf_counter() - t

        from pipeline.study.report import read_table

        df = read_table(out)
        per_cell = df.groupby(["method", "purification"])["cell_seconds"].first()
    return {"images": len(images), "size": 64, "purify_seconds_per_image": purify,
            "cell_seconds": {f"{m}/{p}": float(v) for (m, p), v in per_cell.items()},
            "mean_cell_seconds": float(per_cell.mean()), "study_seconds": total, "protect_steps": args.steps,
            "sdedit": "strengths 0.1,0.2,0.3,0.5 x one_step + ddim20", "cells": int(len(per_cell))}


def bench_scaling(args) -> dict:
    """The same study's mimic cells with 1, 2 and 4 worker nodes of a ray.cluster_utils.Cluster."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.cli import main

    photos = held_out_photos(args.images)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        clean = write_folder(photos, Path(tmp) / "clean")
        for workers in (1, 2, 4):
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
            for _ in range(workers):
                cluster.add_node(num_cpus=1)
            ray.init(address=cluster.address, log_to_driver=False)
            output = str(Path(tmp) / f"study-{workers}")
            base = ["--steps", "2", "--ddim-steps", "20", "--actors", str(workers)]
            purifs = ["none", "jpeg:75", "noise:0.05", "blur:1"]
            main(study_args(clean, output, ["sds-"], [8], purifs, base))  # protect + purify + cells, once
            # time the cells alone: delete the committed cells and run again (protect/purify are reused)
            import shutil

            shutil.rmtree(Path(output) / "tables" / "robustness")
            t = time.perf_counter()
            main(study_args(clean, output, ["sds-"], [8], purifs, base))
            out[workers] = {"cells": 2 * len(purifs), "seconds": time.perf_counter() - t}
            ray.shutdown()
            cluster.shutdown()
    return {"images": len(photos), "physical_cores": os.cpu_count(), "mimic_phase": out}


def bench_table(args) -> dict:
    from pipeline.cli import main
    from pipeline.study.grid import DEFAULT_EPS, DEFAULT_METHODS, DEFAULT_PURIFICATIONS
    from pipeline.study.report import read_table, retained

    photos = held_out_photos(args.images)
    output = str(ROOT / "out" / "bench-study-table")
    clean = write_folder(photos, ROOT / "out" / "bench-study-clean")
    methods = [*DEFAULT_METHODS, "sds-+eot"]
    t = time.perf_counter()
    main(study_args(clean, output, methods, DEFAULT_EPS, DEFAULT_PURIFICATIONS,
                    ["--steps", str(args.steps), "--ddim-steps", "20", "--eot-samples", "2"]))
    seconds = time.perf_counter() - t
    df = read_table(output)
    r = retained(df)
    table = {f"{m} eps={e:g}": {p: (None if np.isnan(v) else round(float(v), 3))
                                for p, v in zip(g["purification"], g["retained"])}
             for (m, e), g in r.groupby(["method", "eps"])}
    none = r[r["purification"] == "none"].set_index(["method", "eps"])["damage"]
    runs = {}
    for p in (Path(output) / "protected").iterdir():
        import pyarrow.parquet as pq

        rows = pq.read_table(p / "tables" / "runs").to_pylist()
        runs[p.name] = sum(x["seconds"] for x in rows if x["status"] == "completed" and x["units_done"])
    cells = df.groupby(["method", "eps", "purification"])["cell_seconds"].first()
    by_purification = cells.groupby(level="purification").mean().round(2).to_dict()
    return {"images": len(photos), "photos": list(photos), "protect_steps": args.steps, "study_seconds": seconds,
            "cells": int(len(cells)), "mean_cell_seconds": round(float(cells.mean()), 2),
            "cell_seconds_by_purification": by_purification,
            "retained": table, "damage_none_psnr_db": {f"{m} eps={e:g}": round(float(v), 3) for (m, e), v in none.items()},
            "protect_seconds": runs, "report": f"{output}/report.html"}


def bench_eot(args) -> dict:
    """photoguard vs photoguard+eot at eps 16: protection retained under the purifications EOT targets."""
    import pyarrow.parquet as pq

    from pipeline.cli import main
    from pipeline.study.report import read_table, retained

    photos = held_out_photos(args.images)
    output = str(ROOT / "out" / "bench-study-eot")
    clean = write_folder(photos, ROOT / "out" / "bench-study-eot-clean")
    t = time.perf_counter()
    main(study_args(clean, output, ["photoguard", "photoguard+eot"], [16], ["none", "jpeg:75", "resize:2", "noise:0.05"],
                    ["--steps", str(args.steps), "--ddim-steps", "20", "--eot-samples", "4",
                     "--eot", "jpeg:50-95,resize:0.5-1,noise:0-0.05"]))
    seconds = time.perf_counter() - t
    r = retained(read_table(output))
    runs = {p.name: sum(x["seconds"] for x in pq.read_table(p / "tables" / "runs").to_pylist()
                        if x["status"] == "completed" and x["units_done"])
            for p in (Path(output) / "protected").iterdir()}
    return {"images": len(photos), "protect_steps": args.steps, "eot_samples": 4, "study_seconds": seconds,
            "retained": {m: dict(zip(g["purification"], [round(float(x), 3) for x in g["retained"]]))
                         for m, g in r.groupby("method")},
            "damage_psnr_db": {f"{m}/{p}": round(float(d), 3) for m, p, d in zip(r["method"], r["purification"], r["damage"])},
            "protect_seconds": runs}


STYLE_METHODS = "sds-,sdst-,photoguard,mist,fastprotect,aspl,sds-+eot"
STYLE_PURIFICATIONS = "none,jpeg:75,diffpure:0.1,gridpure:0.01,pdmpure:0.1,cat:100"  # no noisy_upscale: its built-in upscaler is random


def style_output(i: int) -> Path:
    return ROOT / "out" / f"bench-study-style-{i}"


def bench_style(args) -> dict:
    """One study per held-out artist of the style world (tiny-style; a training mimic learns one artist per
    study): protections x eps x purifications (with the adaptive attacks) x mimics (lora, dreambooth, sdedit).

    `--artist I` runs the I-th held-out artist only (one process per core); `style-table` pools them."""
    from pipeline.cli import main
    from pipeline.data.styles import HELD_OUT_STYLES, artist_images

    indices = [args.artist] if args.artist is not None else range(args.artists)
    out = {}
    for i in indices:
        style = HELD_OUT_STYLES[i]
        # seed 100 + i: the same images as bench_style_mimicry.py's tables
        images = {f"{style.name}/{j}": im for j, im in enumerate(artist_images(style, args.images, 64, seed=100 + i))}
        clean = write_folder(images, ROOT / "out" / f"bench-study-style-clean-{i}")
        t = time.perf_counter()
        main(["study", clean, str(style_output(i)), "--model", "tiny-style", "--device", "cpu",
              "--methods", args.methods, "--eps", args.eps, "--purifications", args.purifications,
              "--scenarios", args.scenarios, "--group-by", "folder", "--style-references", "builtin",
              "--steps", str(args.steps), "--step-size", "2", "--ddim-steps", "20",
              "--lora-steps", str(args.lora_steps), "--lora-lr", "3e-3",
              "--dreambooth-steps", str(args.dreambooth_steps), "--num-images", str(args.num_images),
              "--actors", "1", "--no-progress"])
        out[style.name] = {"study_seconds": round(time.perf_counter() - t, 1)}
    return out


def bench_style_table(args) -> dict:
    """Pool the artists' studies (`style --artist I`): per mimic, the headline damage averaged over artists and
    the share of it each purification leaves (`retained`), the mimic's own score, and seconds per cell."""
    import pandas as pd

    from pipeline.study.report import adaptive_summary, read_table, retained, survival

    frames = {}
    for i in range(args.artists):
        if style_output(i).exists():
            frames[i] = read_table(str(style_output(i)))
    df = pd.concat(frames.values(), ignore_index=True)
    r = retained(df)  # damage averaged over the artists first, then the ratio
    verdicts = {(v["scenario"], v["method"], v["eps"], v["purification"]): v["verdict"] for v in survival(df)}
    purifications = args.purifications.split(",")
    rows = {}
    for (scenario, method, eps), g in r.groupby(["scenario", "method", "eps"]):
        by = dict(zip(g["purification"], zip(g["damage"], g["retained"])))
        rows.setdefault(scenario, {})[f"{method} eps={eps:g}"] = {
            p: {"damage": round(float(by[p][0]), 3),
                "retained": None if np.isnan(by[p][1]) else round(float(by[p][1]), 3),
                "verdict": verdicts.get((scenario, method, eps, p))}
            for p in purifications if p in by}
    # the mimic's own headline score: trained on clean (baseline) and on protected (value) images, per purification
    heads = {"sdedit": "psnr_ref", "lora": "style_accuracy", "dreambooth": "style_accuracy"}
    scores = {}
    for scenario, metric in heads.items():
        m = df[(df["scenario"] == scenario) & (df["metric"] == metric) & (df["method"] != "none")]
        if m.empty:
            continue
        clean = m.groupby("purification")["baseline"].mean()
        protected = {f"{method} eps={eps:g}": {p: round(float(v), 3)
                                               for p, v in g.groupby("purification")["value"].mean().items()}
                     for (method, eps), g in m.groupby(["method", "eps"])}
        scores[scenario] = {"metric": metric, "clean": {p: round(float(clean[p]), 3) for p in purifications
                                                        if p in clean}, "protected": protected}
    cells = df.groupby(["method", "eps", "purification", "scenario"])["cell_seconds"].first()
    import pyarrow.parquet as pq

    protect = {}  # seconds of each protection run (8 images, one core), averaged over the artists
    for i in frames:
        for run in sorted((style_output(i) / "protected").iterdir()):
            records = pq.read_table(run / "tables" / "runs").to_pylist()
            seconds = sum(x["seconds"] for x in records if x["status"] == "completed" and x["units_done"])
            protect.setdefault(run.name, []).append(seconds)
    from pipeline.data.styles import HELD_OUT_STYLES

    return {"artists": [HELD_OUT_STYLES[i].name for i in frames], "retained": rows, "scores": scores,
            "cell_seconds_median": cells.groupby(level="scenario").median().round(2).to_dict(),
            "protect_seconds": {k: round(float(np.mean(v)), 1) for k, v in protect.items()},
            "cells": len(cells), "adaptive": adaptive_summary(df)}


def style_markdown(result: dict, args) -> str:
    """The pooled style table as markdown: one block per mimic, rows protection x eps, columns purifications."""
    purifications = args.purifications.split(",")
    names = {"lora": "LoRA (style accuracy)", "dreambooth": "DreamBooth (style accuracy)", "sdedit": "SDEdit (PSNR to the clean image, dB)"}
    lines = [f"# Adaptive attacks on the style world: {', '.join(result['artists'])} (tiny-style, CPU)", "",
             (f"Command: `python -m benchmarks.bench_study style --artist I` (one process per artist, each pinned to "
             f"one core), then `style-table`. {args.images} images per artist at 64 px; protection {args.steps} PGD steps "
             f"of 2; LoRA {args.lora_steps} steps at lr 3e-3 with text-encoder adapters; DreamBooth "
             f"{args.dreambooth_steps} steps; {args.num_images} generated images per cell; SDEdit DDIM 20."), "",
             ("Each cell: the mimic's score trained on the protected-then-purified images, and in brackets the share of "
             "the unpurified protection's damage that is left after the purification (damage = clean-trained score "
             "minus protected-trained score, both purified the same way, averaged over the artists), shown only "
             "where the study gives a verdict (none where the unpurified damage is under 0.1 dB, or one generated "
             "image of the 16 or less). "
             "The `clean` row is the mimic trained on the clean images, purified the same way."), ""]
    for scenario in ("lora", "dreambooth", "sdedit"):
        score = result["scores"].get(scenario)
        if not score:
            continue
        lines += [f"## {names[scenario]}", "", "| trained on | " + " | ".join(purifications) + " |",
                  "|---" * (len(purifications) + 1) + "|",
                  "| clean | " + " | ".join(f"{score['clean'].get(p, float('nan')):.2f}" for p in purifications) + " |"]
        for row, values in score["protected"].items():
            kept = result["retained"].get(scenario, {}).get(row, {})
            cells = []
            for p in purifications:
                v = values.get(p)
                k, verdict = kept.get(p, {}).get("retained"), kept.get(p, {}).get("verdict")
                cells.append("-" if v is None else f"{v:.2f}" + (f" ({k:.0%})" if verdict else ""))
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines += [""]
    lines += ["## Seconds per cell (median, one core)", "",
              *(f"- {k}: {v:g} s" for k, v in result["cell_seconds_median"].items()), "",
              "Protection runs (8 images, through the pipeline, model load included): "
              + ", ".join(f"{k} {v:g} s" for k, v in result["protect_seconds"].items()), "",
              "## Verdicts (the study report's sentences, pooled over the artists)", "",
              *(f"- {line}" for line in result["adaptive"]), "", "## Machine", "", *machine_lines(1), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("part", choices=["cells", "scaling", "table", "eot", "style", "style-table"])
    p.add_argument("--images", type=int, default=None, help="images (default 4; style: 8 per artist)")
    p.add_argument("--steps", type=int, default=None, help="PGD steps per protection (default 20; style: 16)")
    g = p.add_argument_group("style, style-table")
    g.add_argument("--artists", type=int, default=2, help="held-out artists (one study each)")
    g.add_argument("--artist", type=int, default=None, help="style: run only this held-out artist (0-based)")
    g.add_argument("--methods", default=STYLE_METHODS, help="protections")
    g.add_argument("--eps", default="8,16", help="budgets")
    g.add_argument("--purifications", default=STYLE_PURIFICATIONS, help="purifications")
    g.add_argument("--scenarios", default="lora,dreambooth,sdedit", help="mimics")
    g.add_argument("--lora-steps", type=int, default=300)
    g.add_argument("--dreambooth-steps", type=int, default=60)
    g.add_argument("--num-images", type=int, default=8, help="generated images per cell")
    args = p.parse_args(argv)
    style = args.part.startswith("style")
    args.images = args.images or (8 if style else 4)
    args.steps = args.steps or (16 if style else 20)
    result = {"cells": bench_cells, "scaling": bench_scaling, "table": bench_table, "eot": bench_eot,
              "style": bench_style, "style-table": bench_style_table}[args.part](args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = {"style": f"study_style_{args.artist}" if args.artist is not None else "study_style_runs",
            "style-table": "study_style"}.get(args.part, f"study_{args.part}")
    if args.part == "style-table":
        write_results(name, result, style_markdown(result, args))
        return 0
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
