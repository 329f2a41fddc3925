"""`mimicshield study CLEAN OUTPUT`: protections x budgets x purifications x mimics, one table, one report."""

from __future__ import annotations

import argparse
from dataclasses import replace

from pipeline.commands.help import HelpFormatter
from pipeline.commands.options import (
    add_mimic_options,
    add_protection_options,
    add_run_options,
    apply_config_file,
    floats,
    lead_with,
    mimic_configs_from_args,
    names,
    run_settings_from_args,
    run_with_exit_codes,
)


def add_parser(sub) -> None:
    from pipeline.study.grid import (
        DEFAULT_EPS,
        DEFAULT_METHODS,
        DEFAULT_PURIFICATIONS,
        DEFAULT_SCENARIOS,
    )

    p = sub.add_parser(
        "study",
        help="robustness study: protect once per (method, eps), purify, mimic, one table and report.html",
        description="Protect CLEAN once per (method, eps) (outputs under OUTPUT/protected/), purify the protected "
        "and the clean images the same way with each purification, run each mimic scenario on every purified set "
        "against the clean originals, and write OUTPUT/tables/robustness/*.parquet and OUTPUT/report.html. "
        "CLEAN is a folder of images or WebDataset shards, local or s3://. Rerunning the same command computes "
        "only the missing cells.",
        conflict_handler="resolve",  # --eps and --method below replace protect's single-valued ones
        formatter_class=HelpFormatter,
    )
    p.add_argument("clean", nargs="?", help="the clean images: folder, shards, or s3://bucket/prefix")
    p.add_argument("output", nargs="?", help="output folder or s3:// prefix")
    p.add_argument("--config", default=None, help="YAML or JSON file of these options (clean, output, methods, eps, "
                   "purifications, scenarios, ..., s3: {endpoint_url, region}); command-line options win")
    add_protection_options(p)
    add_run_options(p, actors_help="the study's cell and model-purification actors (default: one per GPU, else one "
                    "per two CPUs); protection runs with protect's default")
    g = p.add_argument_group("grid")
    g.add_argument("--methods", "--method", dest="methods", type=names, default=DEFAULT_METHODS,
                   help="protection methods, comma-separated; NAME+eot protects with --eot "
                   f"(default {','.join(DEFAULT_METHODS)})")
    g.add_argument("--eps", type=floats, default=DEFAULT_EPS,
                   help=f"budgets in [0, 255] pixel units, comma-separated (default {','.join(f'{e:g}' for e in DEFAULT_EPS)})")
    g.add_argument("--purifications", type=names, default=DEFAULT_PURIFICATIONS,
                   help=f"purification specs, comma-separated (default {','.join(DEFAULT_PURIFICATIONS)})")
    g.add_argument("--scenarios", "--scenario", dest="scenarios", type=names, default=DEFAULT_SCENARIOS,
                   help="mimics: sdedit, inpaint, textual_inversion, lora (default sdedit)")
    g.add_argument("--upscaler", default=None, help="noisy_upscale: diffusers x4 upscaler directory or hub id "
                   "(e.g. stabilityai/stable-diffusion-x4-upscaler; default: the built-in random tiny-upscaler)")
    g.add_argument("--upscaler-steps", type=int, default=20, help="noisy_upscale denoising steps (default 20)")
    g.add_argument("--diffpure-steps", type=int, default=20,
                   help="diffpure, gridpure and pdmpure: DDIM steps over the full schedule (default 20)")
    g.add_argument("--gridpure-iterations", type=int, default=20, help="gridpure: purification iterations (default 20, "
                   "the paper's)")
    g.add_argument("--pixel-model", default=None, help="pdmpure: a pixel-space diffusion model, a diffusers DDPMPipeline "
                   "directory or hub id, or a UNet2DModel directory (default: the built-in tiny-pixel)")
    g.add_argument("--samples", type=int, default=2, help="images per cell kept for the report's sample grids")
    g.add_argument("--group-by", default="artist",
                   help="the artist of the training mimics' cells: a metadata field, or 'folder' (sub-folders of CLEAN)")
    add_mimic_options(p, resolution_flag="--mimic-resolution", lpips=False)  # --lpips-weights: protection's
    lead_with(p, "Which protections survive which purifications: protect, purify, mimic, one table and report.",
              ("--model", "--methods", "--eps", "--purifications"),
              "mimicshield study photos/ out/study --model tiny --device cpu --methods sds-,photoguard --eps 4,8 "
              "--steps 20")
    p.set_defaults(func=run, _parser=p)


def settings_from_args(args: argparse.Namespace):
    from pipeline.evaluate.settings import EvalSettings
    from pipeline.protect.eot import DEFAULT_EOT
    from pipeline.study.grid import StudyGrid
    from pipeline.study.run import StudySettings

    s3 = apply_config_file(args)
    if not args.clean or not args.output:
        raise ValueError("CLEAN and OUTPUT are required (on the command line or in --config)")
    grid = StudyGrid(methods=names(args.methods), eps=floats(args.eps), purifications=names(args.purifications),
                     scenarios=names(args.scenarios))
    # the protect run every source is made with: method, eps and EOT are set per source (adapter.protect_settings);
    # --eot (default DEFAULT_EOT) is what NAME+eot methods use; --actors sizes the study's cell actors
    args.input, args.method, args.eps, args.eot = args.clean, grid.methods[0].removesuffix("+eot"), grid.eps[0], \
        args.eot or DEFAULT_EOT
    protect = replace(run_settings_from_args(args, s3), actors=None)
    # the mimics and metrics the cells run (the study's own workers run them: no Ray or S3 options here,
    # those live in `protect` and in StudySettings)
    evaluation = EvalSettings(
        protected=str(args.output), clean=str(args.clean), output=str(args.output), scenarios=grid.scenarios,
        group_by=args.group_by, model=protect.model, inpaint_model=args.inpaint_model, prompt=args.prompt,
        save_images=args.save_images,
        **mimic_configs_from_args(args))
    return StudySettings(grid=grid, protect=protect, evaluation=evaluation, upscaler=args.upscaler,
                         upscaler_steps=args.upscaler_steps, diffpure_steps=args.diffpure_steps, samples=args.samples,
                         gridpure_iterations=args.gridpure_iterations, pixel_model=args.pixel_model,
                         actors=args.actors)


def run(args: argparse.Namespace) -> int:
    from pipeline.study.run import run_study

    outcome = run_with_exit_codes(settings_from_args, run_study, args)
    if isinstance(outcome, int):
        return outcome
    settings, summary = outcome
    from pipeline.study.report import SURVIVAL_RULE, format_summary, format_survival, read_table

    print(summary)
    df = read_table(settings.output, settings.s3)
    text = format_summary(df)
    if text:
        print(text)
    print(f"verdict (does the protection survive each purification? {SURVIVAL_RULE}):")
    print(format_survival(df))
    print(f"report: {summary.report}")
    return 0
