"""`mimicshield demo`: the whole main job on an embedded default, with nothing but the install.

Starts an S3 endpoint on loopback (moto server), uploads WebDataset shards built from
scikit-image's bundled photos (several sizes, one deliberately corrupt sample), runs protection
with the built-in `tiny` model through a local Ray (20 PGD steps of 2 by default, so it takes about a
minute on 2 CPUs), prints the summary, copies the protected shards and tables out of the
loopback bucket into a local folder, and ends with the path of a before/after contact sheet
(`before-after.png`: clean, protected, perturbation amplified). With --evaluate (about 160 s on 2
CPUs in all) it ends instead with a small evaluation:
SDEdit (DDIM, strength 0.3) of the protected and the clean images by the same
built-in model, its table, and `report.html`, whose sample grids show the mimic of each clean
image next to the mimic of its protected copy; and style mimicry (`evaluate_style`): two artists of
the built-in style world, protected with `tiny-style`, learned by textual inversion from the clean and
from the protected images, with the style score and `style-evaluation/report.html`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from pipeline.commands.help import HelpFormatter
from pipeline.commands.options import lead_with

BUCKET = "mimicshield-demo"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the main job on a loopback S3 endpoint with sample photos and the tiny model",
        description="Start a moto S3 server on 127.0.0.1, upload sample WebDataset shards (scikit-image photos, "
        "64-96 px, one corrupt sample), protect them with the built-in tiny model through local Ray "
        "(20 steps by default), print the summary, copy the outputs to --out-dir and write "
        "OUT_DIR/before-after.png (clean, protected, perturbation amplified), its path printed last; --evaluate "
        "adds a small SDEdit evaluation and a style-mimicry one (textual inversion on two style-world artists), with "
        "OUT_DIR/style-evaluation/report.html and OUT_DIR/evaluation/report.html, printed last instead.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out-dir", default="mimicshield-demo", help="local copy of the outputs (default ./mimicshield-demo)")
    d = p.add_argument_group("sample data")
    d.add_argument("--shards", type=int, default=3, help="input shards (default 3)")
    d.add_argument("--samples", type=int, default=8, help="good samples per shard (default 8)")
    g = p.add_argument_group("protection")
    g.add_argument("--steps", type=int, default=20, help="PGD steps (default 20: a demo, not real protection)")
    g.add_argument("--step-size", type=float, default=2.0,
                   help="PGD step in pixel units (default 2: 20 steps of 2 reach the budget's edge; `protect` defaults to 1)")
    # sdst- (SDS(-) plus the textural term) is the paper's pick against SDEdit, the mimic --evaluate runs;
    # `protect` defaults to sds-, which moves tiny's SDEdit mimic less visibly (benchmarks/results/efficacy_cpu.md)
    g.add_argument("--method", default="sdst-",
                   help="protection method (default sdst-: the strongest against SDEdit; `protect` defaults to sds-)")
    g.add_argument("--eps", type=float, default=16.0, help="L-inf budget in pixel units (default 16)")
    g.add_argument("--model", default="tiny", help="model (default: the built-in tiny model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    e = p.add_argument_group("evaluation")
    e.add_argument("--evaluate", action="store_true",
                   help="end with a small SDEdit evaluation and a style-mimicry one (textual inversion), protected vs "
                   "clean, and their report.html files (about 160 s in all on 2 CPUs)")
    e.add_argument("--eval-ddim-steps", type=int, default=20, help="DDIM steps of the evaluation's SDEdit (default 20)")
    e.add_argument("--eval-ti-steps", type=int, default=60,
                   help="training steps of the style evaluation's textual inversion (default 60)")
    lead_with(p, "The main job end to end on sample photos, with nothing but the install.",
              ("--out-dir", "--steps", "--evaluate"), "mimicshield demo --evaluate")
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upload_demo_shards(client, bucket: str, shards: int, samples: int) -> tuple[str, dict[str, bytes]]:
    """Put `shards` sample shards into `bucket`; returns their brace-pattern URI and {key: image bytes} of the
    good samples (the contact sheet's "before")."""
    from pipeline.io.sample_data import bad_samples, photo_samples, shard_bytes

    good = photo_samples(shards * samples, sizes=((64, 64), (64, 96), (96, 96), (80, 64)), formats=("PNG", "PNG", "WEBP"))
    for s in range(shards):
        chunk = good[s * samples : (s + 1) * samples]
        if s == 0:  # one deliberately corrupt sample
            chunk = chunk + bad_samples(good[0]["png"])[:1]
        client.put_object(Bucket=bucket, Key=f"input/shard-{s:06d}.tar", Body=shard_bytes(chunk))
    clean = {g["__key__"]: next(v for k, v in g.items() if k in ("png", "webp", "jpg")) for g in good}
    return f"s3://{bucket}/input/shard-{{000000..{shards - 1:06d}}}.tar", clean


def contact_sheet(local: str, clean: dict[str, bytes], limit: int = 8, cell: int = 128) -> str:
    """LOCAL/before-after.png: for the first `limit` protected images (columns), the clean input, the
    protected copy and the perturbation amplified (rows), centre squares at `cell` px; returns its path."""
    import glob

    from pyarrow import fs as pafs

    from pipeline.evaluate.run import amplified_perturbation, grid, png
    from pipeline.io.images import decode_image
    from pipeline.io.webdataset import read_shard

    before, after = [], []
    for shard in sorted(glob.glob(os.path.join(local, "shard-*.tar"))):
        for row in read_shard(pafs.LocalFileSystem(), shard):
            if row["image"] is not None and row["key"] in clean and len(before) < limit:
                c, p = decode_image(clean[row["key"]]).rgb, decode_image(row["image"]).rgb
                if c.shape == p.shape:
                    before.append(c)
                    after.append(p)
    path = os.path.join(local, "before-after.png")
    if before:
        with open(path, "wb") as f:
            f.write(png(grid([before, after, [amplified_perturbation(c, p) for c, p in zip(before, after)]], cell)))
    return path


def run(args: argparse.Namespace) -> int:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from pipeline.batch.driver import run_protect
    from pipeline.batch.settings import RunSettings
    from pipeline.io.paths import PathArg, PathError, check_paths
    from pipeline.io.storage import S3Options
    from pipeline.models.loading import ModelSpec
    from pipeline.protect import ProtectConfig

    try:
        check_paths([], PathArg("--out-dir", args.out_dir))  # before the server and Ray start
    except PathError as err:
        print(f"mimicshield: error: {err}", file=sys.stderr)
        return 2
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the loopback server's access log
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # dummy credentials for the loopback endpoint only; set before Ray starts so its workers see them
    os.environ.update({"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint})
    os.environ.pop("AWS_SESSION_TOKEN", None)
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        source, clean = upload_demo_shards(client, BUCKET, args.shards, args.samples)
        target = f"s3://{BUCKET}/protected/"
        print(f"demo: S3 endpoint {endpoint}, {args.shards} shards uploaded to {source}", file=sys.stderr)
        print(f"demo: protecting with --model {args.model} --method {args.method} --steps {args.steps} "
              f"--step-size {args.step_size:g} "
              f"(demo settings; real protection uses a real checkpoint and ~100 steps)", file=sys.stderr)
        settings = RunSettings(
            input=source, output=target, config=ProtectConfig(method=args.method, eps=args.eps, steps=args.steps,
                                                            step_size=args.step_size),
            model=ModelSpec(args.model), batch_size=4, progress=not args.no_progress,
            s3=S3Options(endpoint_url=endpoint, region="us-east-1"),
        )
        summary = run_protect(settings, log=lambda m: print(m, file=sys.stderr))
        print(summary)
        local = copy_out(client, BUCKET, "protected/", args.out_dir)
        print_tables(local)
        sheet = contact_sheet(local, clean)
        if args.evaluate:
            print(f"\nbefore / after (rows: clean, protected, perturbation amplified): {sheet}")
            evaluate(args, source, endpoint, client, local)
        else:
            print("\nnext: `mimicshield demo --evaluate` also runs a small SDEdit evaluation of the protected vs the "
                  "clean images and writes report.html with sample grids (about a minute and a half more)")
            print(f"before / after (rows: clean, protected, perturbation amplified): {sheet}")
    finally:
        server.stop()
    return 0


def evaluate(args: argparse.Namespace, source: str, endpoint: str, client, local: str) -> None:
    """SDEdit of the protected vs the clean inputs by the demo's model; table, grids, report.html."""
    from pipeline.evaluate.mimic import SDEditConfig
    from pipeline.evaluate.report import build_report, format_summary
    from pipeline.evaluate.run import run_evaluation
    from pipeline.evaluate.settings import EvalSettings
    from pipeline.io.storage import S3Options
    from pipeline.models.loading import ModelSpec

    print("\ndemo: evaluating: SDEdit (DDIM, strength 0.3) of every protected image and of its clean original",
          file=sys.stderr)
    settings = EvalSettings(
        protected=source.replace("/input/", "/protected/"), clean=source, output=f"s3://{BUCKET}/evaluation",
        scenarios=("sdedit",), model=ModelSpec(args.model), method=args.method, eps=args.eps,
        sdedit=SDEditConfig(strengths=(0.3,), modes=("ddim",), ddim_steps=args.eval_ddim_steps),
        samples_per_group=4, s3=S3Options(endpoint_url=endpoint, region="us-east-1"), progress=not args.no_progress,
    )
    print(run_evaluation(settings, log=lambda m: print(m, file=sys.stderr)), file=sys.stderr)
    folder = copy_out(client, BUCKET, "evaluation/", os.path.join(local, "evaluation"))
    path, summary = build_report(folder)
    print("\nmimicry (SDEdit) of the protected vs the clean images:")
    print(format_summary(summary))
    style_report = evaluate_style(args, endpoint, client, local)
    print(f"style mimicry report (textual inversion trained on clean vs protected images): {style_report}")
    print(f"report with sample grids (the clean and the protected image, each as the mimic sees it and as it "
          f"copies it): {path}")


STYLE_ARTISTS, STYLE_IMAGES = 2, 8  # the style world's first held-out artists, images each


def evaluate_style(args: argparse.Namespace, endpoint: str, client, local: str) -> str:
    """Style mimicry, the attack artists fear most: two artists of the built-in style world (styles the
    `tiny-style` model never saw), protected with the demo's method through the same job, then learned
    by textual inversion from the clean and from the protected images; the style score says whether the
    mimic still paints each artist's style. Returns the style report's path."""
    from pipeline.batch.driver import run_protect
    from pipeline.batch.settings import RunSettings
    from pipeline.evaluate.mimic import TextualInversionConfig
    from pipeline.evaluate.report import build_report, format_summary
    from pipeline.evaluate.run import run_evaluation
    from pipeline.evaluate.settings import EvalSettings
    from pipeline.io.sample_data import shard_bytes, style_world_samples
    from pipeline.io.storage import S3Options
    from pipeline.metrics.mimicry import MetricConfig
    from pipeline.models.loading import ModelSpec
    from pipeline.protect import ProtectConfig

    s3 = S3Options(endpoint_url=endpoint, region="us-east-1")
    client.put_object(Bucket=BUCKET, Key="style/input/shard-000000.tar",
                      Body=shard_bytes(style_world_samples(STYLE_IMAGES, STYLE_ARTISTS)))
    source = f"s3://{BUCKET}/style/input/shard-000000.tar"
    print(f"\ndemo: style mimicry: {STYLE_ARTISTS} artists of the built-in style world x {STYLE_IMAGES} images, "
          f"protected with --model tiny-style --method {args.method}, then textual inversion learns each artist "
          "from the clean and from the protected images", file=sys.stderr)
    protect = RunSettings(input=source, output=f"s3://{BUCKET}/style/protected/", model=ModelSpec("tiny-style"),
                          config=ProtectConfig(method=args.method, eps=args.eps, steps=args.steps,
                                               step_size=args.step_size),
                          batch_size=4, progress=not args.no_progress, s3=s3)
    run_protect(protect, log=lambda m: print(m, file=sys.stderr))
    settings = EvalSettings(
        protected=f"s3://{BUCKET}/style/protected/shard-000000.tar", clean=source,
        output=f"s3://{BUCKET}/style/evaluation", scenarios=("textual_inversion",), group_by="artist",
        model=ModelSpec("tiny-style"), method=args.method, eps=args.eps,
        textual_inversion=TextualInversionConfig(steps=args.eval_ti_steps, num_images=STYLE_IMAGES),
        metrics=MetricConfig(style_references="builtin"), save_images=True, s3=s3, progress=not args.no_progress,
    )
    print(run_evaluation(settings, log=lambda m: print(m, file=sys.stderr)), file=sys.stderr)
    folder = copy_out(client, BUCKET, "style/evaluation/", os.path.join(local, "style-evaluation"))
    path, summary = build_report(folder)
    print("\nstyle mimicry (textual inversion) of the protected vs the clean images:")
    print(format_summary(summary))
    return path


def copy_out(client, bucket: str, prefix: str, out_dir: str) -> str:
    """Copy everything under s3://bucket/prefix to `out_dir` (the loopback bucket ends with the demo)."""
    out_dir = os.path.abspath(out_dir)
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            if not rel or rel.endswith("/"):
                continue  # folder markers
            dest = os.path.join(out_dir, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            client.download_file(bucket, obj["Key"], dest)
    return out_dir


def print_tables(local: str) -> None:
    import pandas as pd

    metrics = pd.read_parquet(os.path.join(local, "tables", "protect_metrics"))
    errors = pd.read_parquet(os.path.join(local, "tables", "errors"))
    print(f"\nwhere to look (copied out of the loopback bucket): {local}")
    print(f"  protected shards: {local}/shard-*.tar  (pipeline.io.samples.read_samples reads them back)")
    print(f"  tables:           {local}/tables/{{protect_metrics,errors,runs}}/*.parquet")
    if len(metrics):
        cols = ["key", "width", "height", "format", "linf", "psnr", "ssim"]
        print("\nprotect_metrics (first rows):")
        print(metrics[cols].head(6).to_string(index=False))
        print(f"  max L-inf {metrics.linf.max():.0f} (budget {metrics.eps.iloc[0]:.0f}), "
              f"mean PSNR {metrics.psnr.mean():.1f} dB, mean SSIM {metrics.ssim.mean():.3f}")
    if len(errors):
        print("\nerrors:")
        print(errors[["key", "source", "stage", "reason"]].to_string(index=False))
