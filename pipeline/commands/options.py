"""Options shared by the sub-commands, and the typed settings built from them (one place each).

- `add_protection_options` / `config_from_args`: what protect and study accept about protection, into
  `ProtectConfig`;
- `add_model_options` / `model_from_args`: the model (protect, study, evaluate), into `ModelSpec`;
- `add_cluster_options`, `add_s3_options` / `s3_from_args`: the Ray cluster and actors, and how to reach S3
  (into `S3Options`), for protect, study and evaluate;
- `add_run_options` / `run_settings_from_args`: the protect run (those two, inputs, resume), into `RunSettings`;
- `add_mimic_options` / `mimic_configs_from_args`: the mimics and metric backbones of evaluate and study;
- `apply_config_file`: ``--config`` YAML/JSON files (the command line wins).

Library code never imports this package: settings objects are the interface.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from pipeline.io.images import DEFAULT_PNG_LEVEL
from pipeline.models.names import DEFAULT_MODEL, DTYPE_NAMES
from pipeline.protect.names import ALL_METHODS

if TYPE_CHECKING:  # the settings classes import torch: each `*_from_args` imports what it builds, when it builds it,
    from pipeline.batch.settings import RunSettings  # so --help, --version and a mistyped option answer at once
    from pipeline.io.storage import S3Options
    from pipeline.models.loading import ModelSpec
    from pipeline.protect.engine import ASPLOptions, ProtectConfig


def floats(text) -> tuple[float, ...]:
    """`0.1,0.2` (or a list from a config file) -> (0.1, 0.2)."""
    if isinstance(text, (list, tuple)):
        return tuple(float(v) for v in text)
    return tuple(float(v) for v in str(text).split(",") if v.strip())


def names(text) -> tuple[str, ...]:
    """`a, b` (or a list from a config file) -> ("a", "b")."""
    if isinstance(text, (list, tuple)):
        return tuple(str(v).strip() for v in text)
    return tuple(v.strip() for v in str(text).split(",") if v.strip())


METHOD_HELP = "; ".join(f"{name}" for name in ALL_METHODS)


def lead_with(parser: argparse.ArgumentParser, summary: str, common: tuple[str, ...], example: str) -> None:
    """`--help` opens with what most runs need: a short usage line, `summary`, `example`, then the `common`
    options in a group of their own ahead of the rest, which stay in their named groups. The parser's
    description (the details: outputs, resume, exit codes) moves after the groups."""
    group = parser.add_argument_group("common options")
    for flag in common:
        action = parser._option_string_actions[flag]
        for other in parser._action_groups:
            if action in other._group_actions:
                other._group_actions.remove(action)
        group._group_actions.append(action)
    parser._action_groups.remove(group)
    parser._action_groups.insert(parser._action_groups.index(parser._positionals) + 1, group)
    parser.usage = " ".join(["%(prog)s", *(a.metavar or a.dest.upper() for a in parser._positionals._group_actions),
                             *(_usage(parser._option_string_actions[flag], flag) for flag in common), "[options]"])
    parser.epilog = parser.description
    parser.description = f"{summary}\n\nexample:\n  {example}"


def _usage(action: argparse.Action, flag: str) -> str:
    """An option as the usage line shows it: `--eps EPS`, `[--evaluate]`; bracketed unless required."""
    text = flag if action.nargs == 0 else f"{flag} {action.metavar or action.dest.upper()}"
    return text if action.required else f"[{text}]"


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
        default="auto",
        help="where protection works: 'auto' (default: about the model's training area, aspect kept, optimised "
             "through the downscale a mimic applies; cost about flat in image size), 'native' (the image's own "
             "size: cost grows as pixels^1.7), or N (an N x N copy, aspect squashed)",
    )
    g.add_argument("--mist-weight", type=float, default=1e4, help="w in mist's L_tex - w L_sem (default 1e4)")
    g.add_argument("--sdst-rate", type=float, default=5.0, help="r in sdst-'s r g_sds + g_tex (default 5)")
    g.add_argument("--eot", default="", help="robust protection (expectation over transformation): average each "
                   "step's direction over random differentiable transforms, e.g. jpeg:50-95,resize:0.5-1,noise:0-0.05")
    g.add_argument("--eot-samples", type=int, default=1, help="transforms K averaged per PGD step with --eot (default 1)")
    g.add_argument("--bank", default=None, help="fastprotect: bank file from `mimicshield train-fastprotect` "
                   "(default: the model's default bank; built on the fly for tiny)")
    g.add_argument("--lpips-weights", default=None, help="fastprotect: torchvision AlexNet weights for a "
                   "calibrated LPIPS strength map (default: random, seeded, uncalibrated)")
    g.add_argument("--aspl-surrogate-steps", type=int, default=3,
                   help="aspl: surrogate fine-tuning steps per round (default 3, Anti-DreamBooth's)")
    g.add_argument("--aspl-pgd-steps", type=int, default=6, help="aspl: PGD steps per round; rounds = steps / this "
                   "(default 6: --steps 300 is the paper's 50 rounds)")
    g.add_argument("--aspl-lr", type=float, default=None, help="aspl: surrogate learning rate (default 5e-7 for "
                   "the full UNet, 1e-4 for the LoRA surrogate of --low-memory)")
    m = parser.add_argument_group("model and device")
    add_model_options(m)
    m.add_argument("--batch-size", type=int, default=4, help="images per protection batch (default 4)")
    m.add_argument("--low-memory", action="store_true",
                   help="less GPU memory, same result: checkpoint the VAE encoder, keep the text encoder on CPU; "
                        "with aspl also a LoRA surrogate instead of a full UNet copy (another result)")


PROTECT_MODEL_HELP = (
    f"hub id or local diffusers directory (SD 1.x, 2.x incl. v-prediction, SDXL, SD3/3.5, FLUX.1), or a "
    f"built-in: tiny, tiny-v, tiny-xl, tiny-sd3, tiny-flux, sd15-arch, sd21-arch, sd21-768-arch, sdxl-arch; "
    f"A,B,... protects against all of them at once (an ensemble, families may mix; not with fastprotect) "
    f"(default {DEFAULT_MODEL})")


def add_model_options(group, model_help: str = PROTECT_MODEL_HELP,
                      revision_help: str = "hub revision (commit, tag) for reproducibility; for an ensemble one per "
                                           "model, comma-separated (empty for the default)",
                      device_help: str = "auto, cpu, cuda, cuda:1 ... (default auto)",
                      dtype_help: str = "weights dtype (auto: fp16 on GPU)") -> None:
    """--model, --revision, --device, --dtype into `group`: what `model_from_args` makes a `ModelSpec` of.
    The help texts are the command's (protect's by default); names, defaults and choices are these."""
    group.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    group.add_argument("--revision", default=None, help=revision_help)
    group.add_argument("--device", default="auto", help=device_help)
    group.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES], help=dtype_help)


def model_from_args(args: argparse.Namespace) -> ModelSpec:
    from pipeline.models.loading import ModelSpec

    return ModelSpec(model=args.model, revision=args.revision, device=args.device, dtype=args.dtype,
                     low_memory=bool(getattr(args, "low_memory", False)))


def config_from_args(args: argparse.Namespace) -> ProtectConfig:
    from pipeline.protect.engine import FastProtectOptions, ProtectConfig

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
        eot=getattr(args, "eot", ""),
        eot_samples=getattr(args, "eot_samples", 1),
        fastprotect=FastProtectOptions(bank=getattr(args, "bank", None), lpips_weights=getattr(args, "lpips_weights", None)),
        aspl=aspl_from_args(args),
    )


def aspl_from_args(args: argparse.Namespace) -> ASPLOptions:
    from pipeline.protect.engine import ASPLOptions

    lora = bool(getattr(args, "low_memory", False))
    lr = getattr(args, "aspl_lr", None)
    defaults = ASPLOptions()
    return ASPLOptions(
        surrogate="lora" if lora else "full",
        surrogate_steps=getattr(args, "aspl_surrogate_steps", defaults.surrogate_steps),
        pgd_steps=getattr(args, "aspl_pgd_steps", defaults.pgd_steps),
        learning_rate=lr if (lr and not lora) else defaults.learning_rate,
        lora_learning_rate=lr if (lr and lora) else defaults.lora_learning_rate,
    )


def add_run_options(parser: argparse.ArgumentParser,
                    actors_help: str = "protection actors (default: one per GPU in the cluster, or 1 on CPU)") -> None:
    """Options of the Ray run itself (cluster, actors, S3 endpoint)."""
    r = parser.add_argument_group("run")
    add_cluster_options(r, actors_help=actors_help)
    add_s3_options(r)
    r.add_argument("--max-pixels", type=int, default=64_000_000,
                   help="refuse larger images before decoding (decompression bombs; default 64e6)")
    r.add_argument("--chunk-size", type=int, default=256, help="files per resumable unit for folder input (default 256)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--on-bad-shard", choices=["skip", "fail"], default="skip",
                   help="a shard that cannot be read whole (truncated, empty, corrupt, not a tar): skip records it "
                   "(errors row, stage read) and writes every other shard, exit code 3; fail stops there (default skip)")
    r.add_argument("--overwrite", action="store_true",
                   help="reprocess every unit even if OUTPUT holds finished ones (needed to change settings there)")
    r.add_argument("--jpeg-as", choices=["jpeg", "png"], default="jpeg",
                   help="JPEG inputs: written as JPEG, the source's own coefficients plus the perturbation's, within "
                   "--eps on every pixel (its tables, subsampling and about its size; the quantisation keeps part "
                   "of the perturbation, reported per file), or as PNG under the same key (all of it) (default jpeg)")
    r.add_argument("--png-level", type=int, default=DEFAULT_PNG_LEVEL, choices=range(10), metavar="0-9",
                   help="zlib level of written PNGs: the same pixels at every level; level 3 writes about 7%% larger "
                   "files than 6 in a third to a half of the CPU time at 512-2048 px, 9 the smallest "
                   f"(default {DEFAULT_PNG_LEVEL})")
    r.add_argument("--stall-timeout", type=float, default=None, metavar="SECONDS",
                   help="end the run (exit 4, committed work kept: rerun to resume) when no sample finishes for "
                   "this long (default: 30x the run's own pace between samples, at least 3600 s; a stall is reported "
                   "sooner, after 10x, at least 120 s). A lost Ray node that leaves the pool no room ends it at once")
    r.add_argument("--max-memory", dest="max_memory_gb", type=float, default=None, metavar="GB",
                   help="memory one protection step may use; an image whose working size needs more becomes an "
                   "error row naming --resolution (default: what the device has free when the image comes)")
    r.add_argument("--follow-external-links", action="store_true",
                   help="folder INPUT: also read symbolic links that lead out of it (default: skipped and counted; "
                   "loops and links back into INPUT are never followed)")
    r.add_argument("--verbose", action="store_true", help="show Ray's own logs, warnings and progress bars "
                   "(kept off the terminal by default; always in /tmp/ray/session_latest/logs/)")


def add_cluster_options(group, actors_help: str,
                        address_help: str = "Ray cluster address (default: RAY_ADDRESS, else a local Ray)") -> None:
    """--address and --actors into `group`: the settings' `address` and `actors`."""
    group.add_argument("--address", default=None, help=address_help)
    group.add_argument("--actors", type=int, default=None, help=actors_help)


def add_s3_options(group) -> None:
    """--endpoint-url, --region, --s3-max-attempts into `group`: what `s3_from_args` makes an `S3Options` of."""
    group.add_argument("--endpoint-url", default=None,
                       help="S3 endpoint, e.g. http://127.0.0.1:9000 for MinIO (default: AWS_ENDPOINT_URL); "
                       "credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    group.add_argument("--region", default=None, help="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    group.add_argument("--s3-max-attempts", type=int, default=10, help="tries of each S3 request, transient faults "
                       "(503 SlowDown, resets, timeouts) retried with backoff (default 10)")


def load_config_file(path: str) -> dict:
    """A YAML or JSON file of option values (keys as on the command line, '-' or '_')."""
    import json

    text = open(path, encoding="utf-8").read()
    if path.endswith(".json"):
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of options")
    return {k.replace("-", "_"): v for k, v in values.items()}


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options given on the command line `argv` (whatever their value, default or not).

    argparse only fills in a default where the namespace lacks the attribute, so parsing into a
    namespace pre-filled with a marker leaves exactly the options that were not given at the marker.
    """
    unset = object()
    probe = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_known_args(argv, namespace=probe)
    return {k for k, v in vars(probe).items() if v is not unset and v is not None}


def apply_config_file(args: argparse.Namespace) -> dict:
    """Fill the options not given on the command line from --config; returns the file's `s3` section.

    The command line wins, also when its value equals the default (``--eps 16`` beats ``eps: 4``).
    """
    if not getattr(args, "config", None):
        return {}
    values = load_config_file(args.config)
    s3 = values.pop("s3", None) or {}
    parser = getattr(args, "_parser", None)
    argv = getattr(args, "_argv", None)
    given = explicit_options(parser, argv) if parser is not None and argv is not None else None
    for key, value in values.items():
        if not hasattr(args, key) or key.startswith("_") or key in ("func", "config"):
            raise ValueError(f"{args.config}: unknown option {key!r}")
        if given is None:  # no command line known (a Namespace built in code): fall back on the defaults
            default = parser.get_default(key) if parser is not None else None
            if getattr(args, key) == default:
                setattr(args, key, value)
        elif key not in given:
            setattr(args, key, value)
    return dict(s3)


def s3_from_args(args: argparse.Namespace, section: dict | None = None) -> S3Options:
    """S3Options from a config file's ``s3:`` section, overridden by --endpoint-url, --region, --s3-max-attempts."""
    values = dict(section or {})
    values.update({k: v for k, v in (("endpoint_url", args.endpoint_url), ("region", args.region)) if v})
    from pipeline.io.storage import S3Options, S3Retry

    return S3Options.of({**values, "retry": S3Retry(max_attempts=getattr(args, "s3_max_attempts", 10))})


def run_settings_from_args(args: argparse.Namespace, s3: dict | None = None) -> RunSettings:
    """The run's typed settings (`ProtectConfig`, `ModelSpec`, `RunSettings`), each built and validated once.

    `s3`: the config file's ``s3`` section when the caller already applied ``--config`` (study does).
    """
    from pipeline.batch.settings import RunSettings

    s3 = apply_config_file(args) if s3 is None else dict(s3)
    if not args.input or not args.output:
        raise ValueError("INPUT and OUTPUT are required (on the command line or in --config)")
    return RunSettings(
        input=str(args.input), output=str(args.output), config=config_from_args(args), model=model_from_args(args),
        batch_size=args.batch_size, actors=args.actors, address=args.address, s3=s3_from_args(args, s3),
        max_pixels=args.max_pixels,
        chunk_size=args.chunk_size, progress=not args.no_progress, verbose=bool(getattr(args, "verbose", False)),
        stall_timeout=getattr(args, "stall_timeout", None), max_memory_gb=getattr(args, "max_memory_gb", None),
        on_bad_shard=args.on_bad_shard,
        overwrite=bool(args.overwrite), jpeg_as=args.jpeg_as, png_level=args.png_level,
        follow_external_links=bool(getattr(args, "follow_external_links", False)),
        group_by=getattr(args, "group_by", None),
    )




def add_mimic_options(parser: argparse.ArgumentParser, resolution_flag: str = "--resolution",
                      lpips: bool = True) -> None:
    """The mimics' options (evaluate and study): SDEdit, inpainting, the training mimics, metric backbones.

    `resolution_flag`: study takes ``--mimic-resolution`` (its ``--resolution`` is protection's);
    `lpips`: study already has ``--lpips-weights`` among the protection options.
    """
    g = parser.add_argument_group("sdedit")
    g.add_argument(resolution_flag, dest="mimic_resolution", type=int, default=None,
                   help="mimic working size (default: the model's)")
    g.add_argument("--strengths", type=floats, default=(0.1, 0.2, 0.3, 0.5), help="SDEdit strengths")
    g.add_argument("--sdedit-modes", type=names, default=("one_step", "ddim"), help="one_step, ddim")
    g.add_argument("--ddim-steps", type=int, default=100, help="SDEdit DDIM steps over the full schedule")
    g = parser.add_argument_group("inpaint")
    g.add_argument("--inpaint-model", default=None,
                   help="inpainting model (default: tiny-inpaint for tiny, SD 1.5 inpainting for SD 1.5, else --model)")
    g.add_argument("--masks", type=names, default=("meta", "center", "random"), help="inpaint mask modes")
    g.add_argument("--inpaint-steps", type=int, default=100, help="inpainting steps")
    g = parser.add_argument_group("training mimics (textual inversion, LoRA, DreamBooth)")
    g.add_argument("--ti-steps", type=int, default=50, help="textual inversion steps (real use: 2000-3000)")
    g.add_argument("--lora-steps", type=int, default=50, help="LoRA steps (real use: 500-1000)")
    g.add_argument("--lora-rank", type=int, default=4, help="LoRA rank")
    g.add_argument("--lora-lr", type=float, default=1e-3,
                   help="LoRA learning rate (default 1e-3; the style-world benchmarks use 3e-3 at 300 steps; SD 1.5: 1e-4)")
    g.add_argument("--dreambooth-steps", type=int, default=50, help="DreamBooth steps (real use: about 1000)")
    g.add_argument("--dreambooth-lr", type=float, default=3e-4,
                   help="DreamBooth learning rate (default 3e-4 for the tiny built-ins; SD 1.5: 5e-7 to 5e-6)")
    g.add_argument("--prior-loss-weight", type=float, default=1.0, help="DreamBooth's lambda (default 1)")
    g.add_argument("--class-prompt", default="a painting",
                   help="DreamBooth's class prompt: its images, drawn by the frozen model, keep the prior")
    g.add_argument("--num-images", type=int, default=4, help="images generated per group and source")
    g.add_argument("--inference-steps", type=int, default=25, help="generation steps")
    g.add_argument("--save-images", action="store_true",
                   help="write the generated images (clean- and protected-trained, same prompts and seeds) "
                        "under OUTPUT/generated/, PNG with an index.json")
    g = parser.add_argument_group("metric backbones (random, and calibrated=false, without them)")
    if lpips:
        g.add_argument("--lpips-weights", default=None, help="torchvision AlexNet state dict for LPIPS")
    g.add_argument("--clip-model", default=None, help="local transformers CLIP directory")
    g.add_argument("--fid-weights", default=None, help="torch-fidelity Inception weights (needs torch-fidelity)")
    g.add_argument("--fid-min-images", type=int, default=50, help="FID only for sets at least this large (KID always)")
    g.add_argument("--style-weights", default=None,
                   help="torchvision VGG-19 state dict for the style score (else a random conv net)")
    g.add_argument("--style-references", default=None,
                   help="more candidate styles for style accuracy besides the groups: 'builtin' (the built-in "
                        "style world's held-out artists) or a folder with one sub-folder of images per style")


def mimic_configs_from_args(args: argparse.Namespace) -> dict:
    """EvalSettings' mimic and metric configs from `add_mimic_options`' options (and --seed, --prompt, --device)."""
    from pipeline.evaluate.mimic import (
        DreamBoothConfig,
        InpaintConfig,
        LoraConfig,
        SDEditConfig,
        TextualInversionConfig,
    )
    from pipeline.metrics.mimicry import MetricConfig

    common = dict(seed=args.seed, resolution=args.mimic_resolution)
    return dict(
        sdedit=SDEditConfig(strengths=floats(args.strengths), modes=names(args.sdedit_modes),
                            ddim_steps=args.ddim_steps, prompt=args.prompt, **common),
        inpaint=InpaintConfig(masks=names(args.masks), steps=args.inpaint_steps, prompt=args.prompt, **common),
        textual_inversion=TextualInversionConfig(steps=args.ti_steps, num_images=args.num_images,
                                                 inference_steps=args.inference_steps, **common),
        lora=LoraConfig(rank=args.lora_rank, steps=args.lora_steps, learning_rate=args.lora_lr, num_images=args.num_images,
                        inference_steps=args.inference_steps, **common),
        dreambooth=DreamBoothConfig(steps=args.dreambooth_steps, learning_rate=args.dreambooth_lr,
                                    prior_loss_weight=args.prior_loss_weight, class_prompt=args.class_prompt,
                                    num_images=args.num_images, inference_steps=args.inference_steps, **common),
        metrics=MetricConfig(lpips_weights=args.lpips_weights, clip_model=args.clip_model,
                             fid_weights=args.fid_weights, fid_min_images=args.fid_min_images, device=args.device,
                             style_weights=args.style_weights, style_references=args.style_references),
    )


def stalled_message(err: BaseException) -> str:
    """What every command says when the watchdog ended its run (exit 4)."""
    return (f"mimicshield: error: the run stalled: {err}\n"
            "mimicshield: rerun the same command to resume (committed work is kept)")


def run_with_exit_codes(build_settings, run, args: argparse.Namespace):
    """(settings, summary) of `run(build_settings(args), log=stderr)`, or the exit code after one line on stderr.

    2: bad options or input found before any work; 4 (``STALL_EXIT``): ended by --stall-timeout (committed work
    kept); 5 (``STORAGE_EXIT``): the output storage failed mid-run (disk full, permission, S3 access). Anything
    else is re-raised. evaluate and study share this; protect has more cases of its own (bad shards).
    """
    import sys

    from pipeline.cluster.watchdog import STALL_EXIT, Stalled
    from pipeline.io.paths import STORAGE_EXIT, storage_problem
    from pipeline.io.storage import InputError
    from pipeline.models.loading import ModelLoadError

    try:
        settings = build_settings(args)
        return settings, run(settings, log=lambda msg: print(msg, file=sys.stderr))
    except (InputError, ModelLoadError, ValueError, FileNotFoundError) as err:  # raised before any actor starts
        print(f"mimicshield: error: {err}", file=sys.stderr)
        return 2
    except Stalled as err:  # --stall-timeout: one line, committed work kept
        print(stalled_message(err), file=sys.stderr)
        return STALL_EXIT
    except Exception as err:
        problem = storage_problem(err)
        if not problem:
            raise
        print(f"mimicshield: error: {problem}", file=sys.stderr)
        return STORAGE_EXIT

