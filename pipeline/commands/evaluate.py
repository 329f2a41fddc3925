"""`mimicshield evaluate PROTECTED --clean CLEAN --output OUTPUT`: mimicry attacks on protected images."""

from __future__ import annotations

import argparse
import sys


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_parser(sub) -> None:
    from ..mimic import SCENARIOS
    from ..models import DEFAULT_MODEL

    p = sub.add_parser(
        "evaluate",
        help="run mimicry attacks (SDEdit, inpainting, textual inversion, LoRA) on protected vs clean images",
        description="Mimic the protected images and their clean originals (joined by sample key) with each "
        "scenario, and write OUTPUT/tables/mimicry_metrics/ (Parquet), sample grids under OUTPUT/samples/ and "
        "the trained mimics under OUTPUT/mimics/. PROTECTED and CLEAN are what `protect` reads and writes: "
        "folders or WebDataset shards, local or s3://. Then `mimicshield report OUTPUT`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("protected", help="protected samples (folder, shards, s3://...)")
    p.add_argument("--clean", required=True, help="the clean originals, with the same keys")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix")
    p.add_argument("--scenario", type=_names, default=SCENARIOS, help=f"comma-separated: {','.join(SCENARIOS)}")
    p.add_argument("--group-by", default="artist", help="metadata field grouping samples for the training mimics")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="mimic model: hub id, local diffusers directory or built-in (tiny, sd15-arch, ...)")
    p.add_argument("--inpaint-model", default=None,
                   help="inpainting model (default: tiny-inpaint for tiny, SD 1.5 inpainting for SD 1.5, else --model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="SDEdit/inpaint weights dtype")
    p.add_argument("--method", default=None, help="protection method, when the samples' metadata lacks it")
    p.add_argument("--eps", type=float, default=None, help="protection budget (0-255), when the metadata lacks it")
    p.add_argument("--run", default=None, help="run name for the table (default: the protection run id)")
    p.add_argument("--prompt", default="a photo", help="prompt for samples without one")
    p.add_argument("--seed", type=int, default=0, help="seed of every mimic (noise, masks, training)")
    p.add_argument("--resolution", type=int, default=None, help="mimic working size (default: the model's)")
    g = p.add_argument_group("sdedit")
    g.add_argument("--strengths", type=_floats, default=(0.1, 0.2, 0.3, 0.5), help="SDEdit strengths")
    g.add_argument("--sdedit-modes", type=_names, default=("one_step", "ddim"), help="one_step, ddim")
    g.add_argument("--ddim-steps", type=int, default=100, help="DDIM steps over the full schedule")
    g = p.add_argument_group("inpaint")
    g.add_argument("--masks", type=_names, default=("meta", "center", "random"), help="mask modes")
    g.add_argument("--inpaint-steps", type=int, default=100)
    g = p.add_argument_group("training mimics (textual inversion, LoRA)")
    g.add_argument("--ti-steps", type=int, default=50, help="textual inversion steps (real use: 2000-3000)")
    g.add_argument("--lora-steps", type=int, default=50, help="LoRA steps (real use: 500-1000)")
    g.add_argument("--lora-rank", type=int, default=4)
    g.add_argument("--num-images", type=int, default=4, help="images generated per group and source")
    g.add_argument("--inference-steps", type=int, default=25, help="generation steps")
    g = p.add_argument_group("metric backbones (random, and calibrated=false, without them)")
    g.add_argument("--lpips-weights", default=None, help="torchvision AlexNet state dict for LPIPS")
    g.add_argument("--clip-model", default=None, help="local transformers CLIP directory")
    g.add_argument("--fid-weights", default=None, help="torch-fidelity Inception weights (needs torch-fidelity)")
    g.add_argument("--fid-min-images", type=int, default=50, help="FID only for sets at least this large (KID always)")
    g = p.add_argument_group("ray")
    g.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    g.add_argument("--actors", type=int, default=None, help="evaluation actors (default: one per GPU, else 1)")
    g.add_argument("--batch-size", type=int, default=4, help="image pairs per per-image actor batch")
    g.add_argument("--samples-per-group", type=int, default=4, help="sample grids per scenario and group")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    from ..eval_metrics import MetricConfig
    from ..evaluate import EvalSettings
    from ..mimic import InpaintConfig, LoraConfig, SDEditConfig, TextualInversionConfig

    common = dict(seed=args.seed, resolution=args.resolution)
    return EvalSettings(
        protected=args.protected, clean=args.clean, output=args.output, scenarios=tuple(args.scenario),
        group_by=args.group_by, model=args.model, inpaint_model=args.inpaint_model, device=args.device,
        dtype=args.dtype, method=args.method, eps=args.eps, run=args.run, prompt=args.prompt,
        sdedit=SDEditConfig(strengths=tuple(args.strengths), modes=tuple(args.sdedit_modes),
                            ddim_steps=args.ddim_steps, prompt=args.prompt, **common),
        inpaint=InpaintConfig(masks=tuple(args.masks), steps=args.inpaint_steps, prompt=args.prompt, **common),
        textual_inversion=TextualInversionConfig(steps=args.ti_steps, num_images=args.num_images,
                                                 inference_steps=args.inference_steps, **common),
        lora=LoraConfig(rank=args.lora_rank, steps=args.lora_steps, num_images=args.num_images,
                        inference_steps=args.inference_steps, **common),
        metrics=MetricConfig(lpips_weights=args.lpips_weights, clip_model=args.clip_model,
                             fid_weights=args.fid_weights, fid_min_images=args.fid_min_images, device=args.device),
        samples_per_group=args.samples_per_group, batch_size=args.batch_size, actors=args.actors,
        address=args.address,
    )


def run(args: argparse.Namespace) -> int:
    from ..evaluate import run_evaluation
    from ..io import InputError
    from ..models import ModelLoadError

    try:
        summary = run_evaluation(settings_from_args(args))
    except (InputError, ModelLoadError, ValueError, FileNotFoundError) as err:  # raised before any actor starts
        print(f"mimicshield: error: {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0
