"""`mimicshield evaluate PROTECTED --clean CLEAN --output OUTPUT`: mimicry attacks on protected images."""

from __future__ import annotations

import argparse

from pipeline.commands.help import HelpFormatter
from pipeline.commands.options import (
    add_cluster_options,
    add_mimic_options,
    add_model_options,
    add_s3_options,
    lead_with,
    mimic_configs_from_args,
    model_from_args,
    names,
    run_with_exit_codes,
    s3_from_args,
)


def add_parser(sub) -> None:
    from pipeline.evaluate.mimic import DEFAULT_SCENARIOS, SCENARIOS

    p = sub.add_parser(
        "evaluate",
        help="run mimicry attacks (SDEdit, inpainting, textual inversion, LoRA) on protected vs clean images",
        description="Mimic the protected images and their clean originals (joined by sample key) with each "
        "scenario, and write OUTPUT/tables/mimicry_metrics/ (Parquet), sample grids under OUTPUT/samples/ and "
        "the trained mimics under OUTPUT/mimics/. PROTECTED and CLEAN are what `protect` reads and writes: "
        "folders or WebDataset shards, local or s3://. Ends with a verdict per method and mimic and writes "
        "OUTPUT/report.html (--no-report to skip; `mimicshield report OUTPUT` rebuilds it).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("protected", help="protected samples (folder, shards, s3://...)")
    p.add_argument("--clean", required=True, help="the clean originals, with the same keys")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix")
    p.add_argument("--scenario", type=names, default=DEFAULT_SCENARIOS,
                   help=f"comma-separated: {','.join(SCENARIOS)} (dreambooth fine-tunes a copy of the UNet per group)")
    i = p.add_argument_group("inputs")
    i.add_argument("--group-by", default="artist", help="what groups samples (artists) for the training mimics: a "
                   "metadata field, or 'folder' (a folder INPUT's sub-folders: art/<artist>/...)")
    m = p.add_argument_group("model and device")
    add_model_options(m, model_help="mimic model: hub id, local diffusers directory or built-in (tiny, sd15-arch, ...)",
                      revision_help="hub revision (commit, tag) of --model, for reproducibility",
                      device_help="auto, cpu, cuda, ...", dtype_help="SDEdit/inpaint weights dtype")
    i.add_argument("--method", default=None, help="protection method, when the samples' metadata lacks it")
    i.add_argument("--eps", type=float, default=None, help="protection budget (0-255), when the metadata lacks it")
    i.add_argument("--run", default=None, help="run name for the table (default: the protection run id)")
    i.add_argument("--prompt", default="a photo", help="prompt for samples without one")
    m.add_argument("--seed", type=int, default=0, help="seed of every mimic (noise, masks, training)")
    add_mimic_options(p)
    g = p.add_argument_group("ray")
    add_cluster_options(g, address_help="Ray address (default: RAY_ADDRESS or a local Ray)",
                        actors_help="evaluation actors (default: one per GPU, else 1)")
    g.add_argument("--batch-size", type=int, default=4, help="image pairs per per-image actor batch")
    g.add_argument("--samples-per-group", type=int, default=4, help="sample grids per scenario and group")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn only in a terminal)")
    g.add_argument("--verbose", action="store_true", help="show Ray's own logs and operator progress bars")
    g.add_argument("--no-report", action="store_true", help="do not write OUTPUT/report.html (`mimicshield report "
                   "OUTPUT` writes it later)")
    add_s3_options(p.add_argument_group("s3"))
    lead_with(p, "Mimic the protected images and their clean originals; say whether the protection holds.",
              ("--clean", "--output", "--model", "--scenario"),
              "mimicshield evaluate out/protected --clean photos/ --output out/eval --model tiny --scenario sdedit "
              "--device cpu")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    from pipeline.evaluate.settings import EvalSettings

    return EvalSettings(
        protected=args.protected, clean=args.clean, output=args.output, scenarios=names(args.scenario),
        group_by=args.group_by, inpaint_model=args.inpaint_model, model=model_from_args(args),
        method=args.method, eps=args.eps, run=args.run, prompt=args.prompt, **mimic_configs_from_args(args),
        samples_per_group=args.samples_per_group, save_images=args.save_images, batch_size=args.batch_size,
        actors=args.actors, address=args.address, s3=s3_from_args(args),
        verbose=bool(getattr(args, "verbose", False)), progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.evaluate.run import run_evaluation

    outcome = run_with_exit_codes(settings_from_args, run_evaluation, args)
    if isinstance(outcome, int):
        return outcome
    settings, summary = outcome
    from pipeline.evaluate.report import build_report, format_verdicts, read_metrics

    print(summary)
    print("verdict (the mimic of the protected images against the mimic of the clean ones, calibrated figures only):")
    print(format_verdicts(read_metrics(settings.output, settings.s3)))
    if not args.no_report:
        path, _ = build_report(settings.output, settings.s3)
        print(f"report: {path}")
    return 0
