"""`mimicshield protect INPUT OUTPUT`: protect every image under INPUT, write them under OUTPUT."""

from __future__ import annotations

import argparse
import sys

from ..models import DEFAULT_MODEL, DTYPES
from ..protect import ALL_METHODS, ProtectConfig

METHOD_HELP = "; ".join(f"{name}" for name in ALL_METHODS)


def add_protection_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs protection."""
    g = parser.add_argument_group("protection")
    g.add_argument("--method", default="sds-", help=f"protection method (default sds-): {METHOD_HELP}")
    g.add_argument("--eps", type=float, default=16.0, help="L-inf budget in [0, 255] pixel units (default 16)")
    g.add_argument("--step-size", type=float, default=1.0, help="PGD step size in pixel units (default 1)")
    g.add_argument("--steps", type=int, default=100, help="PGD steps (default 100)")
    g.add_argument("--init", choices=["random", "zero"], default="random", help="PGD start (default random)")
    g.add_argument("--seed", type=int, default=0, help="seed; each sample's noise derives from it and its key")
    g.add_argument("--prompt", default="a photo", help="prompt c for samples without one (default 'a photo')")
    g.add_argument("--target", default=None, help="target image for textural methods (default: built-in pattern)")
    g.add_argument(
        "--resolution",
        default="native",
        help="'native' (work at the image's size, padded) or N (protect an N x N copy, map back)",
    )
    g.add_argument("--mist-weight", type=float, default=1e4, help="w in mist's L_tex - w L_sem (default 1e4)")
    g.add_argument("--sdst-rate", type=float, default=5.0, help="r in sdst-'s r g_sds + g_tex (default 5)")
    m = parser.add_argument_group("model and device")
    m.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id or local diffusers directory, or a built-in: tiny, sd15-arch, sd21-arch (default {DEFAULT_MODEL})",
    )
    m.add_argument("--revision", default=None, help="hub revision (commit, tag) for reproducibility")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    m.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights dtype (auto: fp16 on GPU)")
    m.add_argument("--batch-size", type=int, default=4, help="images per protection batch (default 4)")


def config_from_args(args: argparse.Namespace) -> ProtectConfig:
    return ProtectConfig(
        method=args.method,
        eps=args.eps,
        step_size=args.step_size,
        steps=args.steps,
        init=args.init,
        seed=args.seed,
        prompt=args.prompt,
        target=args.target,
        resolution=args.resolution,
        mist_weight=args.mist_weight,
        sdst_rate=args.sdst_rate,
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "protect",
        help="protect a folder of images",
        description="Protect every image under INPUT_DIR and write it under OUTPUT_DIR with the same "
        "relative name, format and size, plus OUTPUT_DIR/metrics.parquet (and .csv) with per-image "
        "L-inf, PSNR, SSIM and seconds, and OUTPUT_DIR/errors.csv for inputs that could not be protected.",
    )
    p.add_argument("input", help="input folder of images")
    p.add_argument("output", help="output folder")
    add_protection_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..local import protect_folder
    from ..models import ModelLoadError

    try:
        config = config_from_args(args)
        summary = protect_folder(
            args.input, args.output, config, model=args.model, device=args.device, dtype=args.dtype,
            batch_size=args.batch_size, revision=args.revision,
        )
    except (ModelLoadError, ValueError, FileNotFoundError) as err:
        print(f"mimicshield: error: {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0
