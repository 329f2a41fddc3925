"""Robustness-study benchmarks on CPU with the built-in tiny model.

    python benchmarks/bench_study.py cells     # seconds per purification (per image) and per cell
    python benchmarks/bench_study.py scaling   # the mimic phase with 1, 2, 4 Ray workers (Cluster simulation)
    python benchmarks/bench_study.py table     # protection retained, default grid (+ sds-+eot), held-out photos
    python benchmarks/bench_study.py eot       # photoguard vs photoguard+eot at eps 16 under jpeg/resize/noise
    python benchmarks/bench_study.py style     # a reduced grid with aspl and dreambooth on the style world's held-out artists

Held-out photos: crops of scikit-image's bundled photos the tiny model never saw in training
(`pipeline.models.builtin.training.HELD_OUT`: rocket, motorcycle), at 64 x 64.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MIMICSHIELD_CACHE", str(ROOT / ".cache" / "mimicshield"))
RESULTS = ROOT / "benchmarks" / "results"


def held_out_photos(n: int, size: int = 64) -> dict[str, np.ndarray]:
    """n images at size x size from the photos tiny never saw in training (models.builtin.training.HELD_OUT)."""
    from pipeline.models.builtin.training import HELD_OUT, held_out_images

    per_photo = max(0, -(-n // len(HELD_OUT)) - 1)  # the centre square of each photo, then random crops
    x = held_out_images(size, per_photo)
    names = [f"{name}-{j}" for name in HELD_OUT for j in range(per_photo + 1)]
    images = [np.asarray((im.permute(1, 2, 0) * 255).round().byte()) for im in x]
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


def bench_style(args) -> dict:
    """One study per held-out artist of the style world (tiny-style; a training mimic learns one artist per
    study): protections x eps 16 x purifications (with the adaptive attacks) x mimics (dreambooth, sdedit)."""
    from pipeline.cli import main
    from pipeline.models.builtin.styles import HELD_OUT_STYLES, artist_images
    from pipeline.study.report import adaptive_summary, read_table, retained

    methods, purifications = args.methods.split(","), args.purifications.split(",")
    out = {"artists": {}, "methods": methods, "purifications": purifications, "images": args.images,
           "protect_steps": args.steps}
    for i, style in enumerate(HELD_OUT_STYLES[: args.artists]):
        images = {f"{style.name}/{j}": im for j, im in enumerate(artist_images(style, args.images, 64, seed=900 + i))}
        clean = write_folder(images, ROOT / "out" / f"bench-study-style-clean-{i}")
        output = str(ROOT / "out" / f"bench-study-style-{i}")
        t = time.perf_counter()
        main(["study", clean, output, "--model", "tiny-style", "--device", "cpu", "--methods", ",".join(methods),
              "--eps", "16", "--purifications", ",".join(purifications), "--scenarios", "dreambooth,sdedit",
              "--group-by", "folder", "--style-references", "builtin", "--steps", str(args.steps), "--step-size", "2",
              "--ddim-steps", "20", "--dreambooth-steps", "60", "--num-images", "4", "--no-progress"])
        seconds = time.perf_counter() - t
        df = read_table(output)
        r = retained(df)
        cells = df.groupby(["method", "eps", "purification", "scenario"])["cell_seconds"].first()
        base = df[(df["method"] == "none") & (df["purification"] == "none") & (df["scenario"] == "dreambooth")
                  & (df["metric"] == "style_accuracy")]["value"]
        out["artists"][style.name] = {
            "study_seconds": round(seconds, 1), "cells": int(len(cells)),
            "cell_seconds_by_scenario": cells.groupby(level="scenario").mean().round(2).to_dict(),
            "clean_dreambooth_style_accuracy": None if base.empty else round(float(base.mean()), 3),
            "retained": {f"{sc}: {m}": {p: (None if np.isnan(v) else round(float(v), 3))
                                        for p, v in zip(g["purification"], g["retained"])}
                         for (sc, m), g in r.groupby(["scenario", "method"])},
            "damage_none": {f"{sc}: {m}": round(float(d), 3) for sc, m, d in
                            r[r["purification"] == "none"][["scenario", "method", "damage"]].itertuples(index=False)},
            "adaptive": adaptive_summary(df),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("part", choices=["cells", "scaling", "table", "eot", "style"])
    p.add_argument("--artists", type=int, default=2, help="style: held-out artists (one study each)")
    p.add_argument("--methods", default="sds-,photoguard,aspl", help="style: protections")
    p.add_argument("--purifications", default="none,jpeg:75,gridpure:0.01,pdmpure:0.1", help="style: purifications")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="PGD steps per protection")
    args = p.parse_args(argv)
    result = {"cells": bench_cells, "scaling": bench_scaling, "table": bench_table, "eot": bench_eot,
              "style": bench_style}[args.part](args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"study_{args.part}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
