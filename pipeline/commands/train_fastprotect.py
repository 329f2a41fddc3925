"""`mimicshield train-fastprotect --model M --data DATA [--out BANK]`: pre-train a FastProtect bank.

DATA is a folder of images, WebDataset shards (local or s3://, see `pipeline.io`), or
``skimage`` (crops of scikit-image's bundled photos: the built-in tiny model's default bank).
Without --out the bank goes to the model's default path, $MIMICSHIELD_CACHE/banks/<model>-default.safetensors,
where `mimicshield protect --method fastprotect` finds it when --bank is omitted.
A JSON-lines loss log is written next to the bank (BANK.log.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.commands.options import model_from_args  # the spec of the model the bank is trained for
from pipeline.models.names import DEFAULT_MODEL, DTYPE_NAMES

TRAIN_FIELDS = ("steps", "batch_size", "resolution", "groups", "eta", "feature_weight", "lr", "seed", "log_every")


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by this command and jobs/train_fastprotect.py.

    Training defaults are `TrainConfig()`'s (the paper-like recipe at 512 x 512), or, for the
    built-in ``tiny`` model, `TINY_DEFAULT`'s: so ``--model tiny --data skimage`` writes exactly
    the default tiny bank that `protect --method fastprotect` would otherwise build on the fly.
    """
    from pipeline.protect.fastprotect.recipe import TINY_DEFAULT, TrainConfig

    d, t = TrainConfig(), TINY_DEFAULT

    def default(name: str) -> str:
        return f"(default {getattr(d, name):g}; tiny: {getattr(t, name):g})"

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model to protect against (default {DEFAULT_MODEL}; built-in: tiny)")
    parser.add_argument("--revision", default=None, help="hub revision")
    parser.add_argument("--data", required=True, help="training images: folder, shards (local or s3://), or 'skimage'")
    parser.add_argument("--out", default=None, help="bank file (default: the model's default bank path)")
    parser.add_argument("--steps", type=int, default=None, help=f"Adam steps {default('steps')}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"images per step, x3 targets {default('batch_size')}")
    parser.add_argument("--resolution", type=int, default=None, help=f"training side R {default('resolution')}")
    parser.add_argument("--groups", type=int, default=None, help=f"K, group perturbations {default('groups')}")
    parser.add_argument("--eta", type=float, default=None, help=f"budget of d_g + d_k, [0, 255] pixel units {default('eta')}")
    parser.add_argument("--feature-weight", type=float, default=None, help=f"lambda {default('feature_weight')}")
    parser.add_argument("--lr", type=float, default=None, help=f"Adam learning rate {default('lr')}")
    parser.add_argument("--seed", type=int, default=None, help="seed (groups, batches; default 0)")
    parser.add_argument("--max-images", type=int, default=None, help="use at most this many images (held in memory at R x R; "
                        "skimage: number of crops, default 32)")
    parser.add_argument("--log-every", type=int, default=None, help="log the loss every N steps")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda ... (default auto)")
    parser.add_argument("--dtype", default="fp32", choices=["auto", *DTYPE_NAMES], help="model dtype (default fp32)")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// data (default: AWS env vars)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config_from_args(args: argparse.Namespace):
    from dataclasses import replace

    from pipeline.protect.fastprotect.recipe import TINY_DEFAULT, TrainConfig

    base = TINY_DEFAULT if args.model == "tiny" else TrainConfig()
    return replace(base, **{k: v for k in TRAIN_FIELDS if (v := getattr(args, k, None)) is not None})


def add_parser(sub) -> None:
    p = sub.add_parser("train-fastprotect", help="pre-train a FastProtect bank (mixture of perturbations)",
                       description=__doc__.split("\n\n", 1)[1])
    add_training_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.models.loading import ModelLoadError
    from pipeline.protect.fastprotect.bank import default_bank_path
    from pipeline.protect.fastprotect.train import load_training_images, train_bank

    try:
        config = train_config_from_args(args)
        models = model_from_args(args).load()
        s3 = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
        images, summary = load_training_images(args.data, config.resolution, args.max_images, config.seed, s3)
        out = Path(args.out) if args.out else default_bank_path(args.model)
        out.parent.mkdir(parents=True, exist_ok=True)
        log_path = out.with_name(out.name + ".log.jsonl")
        bank, _ = train_bank(models, images, config, summary, log_path=log_path, progress=not args.no_progress)
        bank.save(out)
    except (ModelLoadError, ValueError, FileNotFoundError) as err:
        print(f"mimicshield: error: {err}", file=sys.stderr)
        return 2
    meta = bank.metadata
    print(json.dumps({"bank": str(out), "log": str(log_path), "model": meta["model_id"], "images": summary["n_images"],
                      "loss_initial": round(meta["loss_initial"], 4), "loss_final": round(meta["loss_final"], 4),
                      "group_sizes": meta["group_sizes"], "seconds": meta["training"]["seconds"]}))
    return 0
