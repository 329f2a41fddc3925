"""`mimicshield study CLEAN OUTPUT`: protections x budgets x purifications x mimics, one table, one report."""

from __future__ import annotations

import argparse
import sys


def _floats(text) -> tuple[float, ...]:
    if isinstance(text, (list, tuple)):
        return tuple(float(v) for v in text)
    return tuple(float(v) for v in str(text).split(",") if v.strip())


def _names(text) -> tuple[str, ...]:
    if isinstance(text, (list, tuple)):
        return tuple(str(v).strip() for v in text)
    return tuple(v.strip() for v in str(text).split(",") if v.strip())


def add_parser(sub) -> None:
    from ..study import adapter
    from ..study.grid import DEFAULT_EPS, DEFAULT_METHODS, DEFAULT_PURIFICATIONS, DEFAULT_SCENARIOS

    p = sub.add_parser(
        "study",
        help="robustness study: protect once per (method, eps), purify, mimic, one table and report.html",
        description="Protect CLEAN once per (method, eps) (outputs under OUTPUT/protected/), purify the protected "
        "and the clean images the same way with each purification, run each mimic scenario on every purified set "
        "against the clean originals, and write OUTPUT/tables/robustness/*.parquet and OUTPUT/report.html. "
        "CLEAN is a folder of images or WebDataset shards, local or s3://. Rerunning the same command computes "
        "only the missing cells.",
        conflict_handler="resolve",  # --eps and --method below replace protect's single-valued ones
    )
    p.add_argument("clean", nargs="?", help="the clean images: folder, shards, or s3://bucket/prefix")
    p.add_argument("output", nargs="?", help="output folder or s3:// prefix")
    p.add_argument("--config", default=None, help="YAML or JSON file of these options (clean, output, methods, eps, "
                   "purifications, scenarios, ..., s3: {endpoint_url, region}); command-line options win")
    adapter.add_protect_options(p)
    g = p.add_argument_group("grid")
    g.add_argument("--methods", "--method", dest="methods", type=_names, default=DEFAULT_METHODS,
                   help="protection methods, comma-separated; NAME+eot protects with --eot "
                   f"(default {','.join(DEFAULT_METHODS)})")
    g.add_argument("--eps", type=_floats, default=DEFAULT_EPS,
                   help=f"budgets in [0, 255] pixel units, comma-separated (default {','.join(f'{e:g}' for e in DEFAULT_EPS)})")
    g.add_argument("--purifications", type=_names, default=DEFAULT_PURIFICATIONS,
                   help=f"purification specs, comma-separated (default {','.join(DEFAULT_PURIFICATIONS)})")
    g.add_argument("--scenarios", "--scenario", dest="scenarios", type=_names, default=DEFAULT_SCENARIOS,
                   help="mimics: sdedit, inpaint, textual_inversion, lora (default sdedit)")
    g.add_argument("--upscaler", default=None, help="noisy_upscale: diffusers x4 upscaler directory or hub id "
                   "(e.g. stabilityai/stable-diffusion-x4-upscaler; default: the built-in random tiny-upscaler)")
    g.add_argument("--upscaler-steps", type=int, default=20, help="noisy_upscale denoising steps (default 20)")
    g.add_argument("--diffpure-steps", type=int, default=20, help="diffpure DDIM steps over the full schedule")
    g.add_argument("--samples", type=int, default=2, help="images per cell kept for the report's sample grids")
    e = p.add_argument_group("mimics (as for `mimicshield evaluate`)")
    e.add_argument("--inpaint-model", default=None, help="inpainting model (default: the model's inpainting twin)")
    e.add_argument("--mimic-resolution", type=int, default=None, help="mimic working size (default: the model's)")
    e.add_argument("--strengths", type=_floats, default=(0.1, 0.2, 0.3, 0.5), help="SDEdit strengths")
    e.add_argument("--sdedit-modes", type=_names, default=("one_step", "ddim"), help="one_step, ddim")
    e.add_argument("--ddim-steps", type=int, default=100, help="SDEdit DDIM steps over the full schedule")
    e.add_argument("--masks", type=_names, default=("meta", "center", "random"), help="inpaint mask modes")
    e.add_argument("--inpaint-steps", type=int, default=100)
    e.add_argument("--ti-steps", type=int, default=50)
    e.add_argument("--lora-steps", type=int, default=50)
    e.add_argument("--lora-rank", type=int, default=4)
    e.add_argument("--num-images", type=int, default=4, help="images generated per training mimic")
    e.add_argument("--inference-steps", type=int, default=25)
    e.add_argument("--clip-model", default=None, help="local transformers CLIP directory")
    e.add_argument("--fid-weights", default=None, help="torch-fidelity Inception weights")
    e.add_argument("--fid-min-images", type=int, default=50)
    p.set_defaults(func=run, _parser=p)


def settings_from_args(args: argparse.Namespace):
    from ..study import adapter
    from ..study.grid import StudyGrid
    from ..study.run import StudySettings

    s3 = adapter.apply_config_file(args)
    if not args.clean or not args.output:
        raise ValueError("CLEAN and OUTPUT are required (on the command line or in --config)")
    if args.endpoint_url:
        s3["endpoint_url"] = args.endpoint_url
    if args.region:
        s3["region"] = args.region
    grid = StudyGrid(methods=_names(args.methods), eps=_floats(args.eps), purifications=_names(args.purifications),
                     scenarios=_names(args.scenarios))
    # the protection template: method and eps are set per source (adapter.protect)
    protect = adapter.protect_config_from_args(argparse.Namespace(
        **{**vars(args), "method": grid.methods[0].removesuffix("+eot"), "eps": grid.eps[0]}))
    evaluation = adapter.eval_settings_from_args(
        args, protected=str(args.output), clean=str(args.clean), output=str(args.output), scenario=grid.scenarios,
        group_by="artist", model=args.model, inpaint_model=args.inpaint_model, device=args.device, dtype=args.dtype,
        method=None, eps=None, run=None, prompt=args.prompt, seed=args.seed, resolution=args.mimic_resolution,
        strengths=_floats(args.strengths), sdedit_modes=_names(args.sdedit_modes), ddim_steps=args.ddim_steps,
        masks=_names(args.masks), inpaint_steps=args.inpaint_steps, ti_steps=args.ti_steps,
        lora_steps=args.lora_steps, lora_rank=args.lora_rank, num_images=args.num_images,
        inference_steps=args.inference_steps, lpips_weights=args.lpips_weights, clip_model=args.clip_model,
        fid_weights=args.fid_weights, fid_min_images=args.fid_min_images, batch_size=args.batch_size,
        actors=args.actors, address=args.address, samples_per_group=args.samples)
    from ..models import ModelSpec
    from ..protect.eot import DEFAULT_EOT

    return StudySettings(
        clean=str(args.clean), output=str(args.output), grid=grid, protect=protect, evaluation=evaluation,
        model=ModelSpec(args.model, revision=args.revision, device=args.device, dtype=args.dtype,
                        low_memory=bool(args.low_memory)),
        batch_size=args.batch_size, eot=args.eot or DEFAULT_EOT, eot_samples=args.eot_samples,
        upscaler=args.upscaler, upscaler_steps=args.upscaler_steps, diffpure_steps=args.diffpure_steps,
        seed=args.seed, samples=args.samples, actors=args.actors, address=args.address, s3=s3,
        max_pixels=args.max_pixels, chunk_size=args.chunk_size, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from ..io import InputError
    from ..models import ModelLoadError
    from ..study.run import run_study

    try:
        settings = settings_from_args(args)
        summary = run_study(settings, log=lambda msg: print(msg, file=sys.stderr))
    except (InputError, ModelLoadError, ValueError, FileNotFoundError) as err:
        print(f"mimicshield: error: {err}", file=sys.stderr)
        return 2
    print(summary)
    from ..study.report import format_summary, read_table

    text = format_summary(read_table(settings.output, settings.s3))
    if text:
        print(text)
    return 0
