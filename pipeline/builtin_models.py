"""Built-in Stable Diffusion models, for tests, benchmarks and the demo (nothing is downloaded).

Each built-in model is assembled from a config (below) and, for the trained ones, weights
shipped in this package; it is saved once in diffusers format (safetensors) to a cache
directory and from then on loaded through the very same `from_pretrained` path as a real
checkpoint.

- ``tiny``         an SD 1.x-shaped latent diffusion model small enough for CPU, *trained* on
                   scikit-image's bundled photos by `pipeline.builtin_training` (weights in
                   ``pipeline/weights/``, sha256 checked on load): its VAE (1/8 downsampling,
                   4 latent channels, like SD's) reconstructs held-out photos, its latent scale is
                   calibrated (1/std of latents, as SD's 0.18215 is) and its UNet denoises those
                   latents conditioned on the text encoder (random, seeded, frozen; shipped too).
                   Small enough to measure whether a protection hurts a mimic; not a real model.
- ``tiny-inpaint`` the same VAE and text encoder with a 9-channel UNet trained to inpaint.
- ``sd15-arch``    the real SD 1.5 architecture with random weights (speed/memory benchmarks).
- ``sd21-arch``    the real SD 2.1-base architecture with random weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

BUILTIN_VERSION = "v2"  # bump when a config below changes, so caches are rebuilt
SEED = 0


def cache_root() -> Path:
    root = os.environ.get("MIMICSHIELD_CACHE") or Path.home() / ".cache" / "mimicshield"
    return Path(root) / "models"


# --------------------------------------------------------------------------- configs as data

_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    prediction_type="epsilon",
    steps_offset=1,
)

_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

_SD_UNET_BLOCKS = dict(
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    sample_size=64,
)

CONFIGS: dict[str, dict] = {
    "tiny": dict(
        vae=dict(
            in_channels=3,
            out_channels=3,
            # four blocks like SD, so the latent is 1/8 of the image, with few channels
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[16, 32, 64, 128],  # cheap at full resolution, wide at 1/8
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,  # replaced by the calibrated scale of the shipped weights
        ),
        unet=dict(
            in_channels=4,
            out_channels=4,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            block_out_channels=[32, 64],
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
            sample_size=8,
        ),
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="quick_gelu",
        ),
        dtype=torch.float32,
    ),
    "sd15-arch": dict(
        vae=_SD_VAE,
        unet=dict(
            in_channels=4,
            out_channels=4,
            cross_attention_dim=768,
            attention_head_dim=8,
            **_SD_UNET_BLOCKS,
        ),
        text=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            vocab_size=49408,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
        dtype=torch.float16,  # random weights: store them small, load in any dtype
    ),
    "sd21-arch": dict(
        vae=_SD_VAE,
        unet=dict(
            in_channels=4,
            out_channels=4,
            cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20],
            use_linear_projection=True,
            **_SD_UNET_BLOCKS,
        ),
        text=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            vocab_size=49408,
            projection_dim=512,
            hidden_act="gelu",
        ),
        dtype=torch.float16,
    ),
}
CONFIGS["tiny-inpaint"] = dict(CONFIGS["tiny"], unet=dict(CONFIGS["tiny"]["unet"], in_channels=9))

BUILTIN_MODELS = tuple(CONFIGS)


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer():
    """A byte-level CLIP tokenizer with a small vocabulary built here (no download).

    Every byte maps to a symbol (as in CLIP's BPE), with and without the end-of-word mark,
    plus a few merges for the words our default prompts use, so any text tokenizes.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in ("a", "an", "of", "photo", "painting", "artwork", "anime", "picture",
                 "landscape", "portrait", "style", "in", "the", "by"):
        # a left-to-right merge chain: p h -> ph, ph o -> pho, ... ending with </w>
        pieces = list(word)
        pieces[-1] += "</w>"
        current = pieces[0]
        for nxt in pieces[1:]:
            merges.append((current, nxt))
            current = current + nxt
            if current not in vocab_list:
                vocab_list.append(current)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


# --------------------------------------------------------------------------- trained weights

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_NAME = "tiny-v2.safetensors"  # made by `python -m pipeline.builtin_training` (seed 0)
# the two commands that made it (curve: benchmarks/results/builtin_tiny_curve.jsonl); phase 1 trains
# at a constant learning rate, so its weights after 450 steps do not depend on the planned total
WEIGHTS_RECIPE = (
    "python -m pipeline.builtin_training --out A --vae-steps 450 --vae-only --threads 1",
    "python -m pipeline.builtin_training --out A --vae-init A/vae-checkpoint.safetensors --vae-steps 100 "
    "--vae-lr 4e-4 --vae-seed 1 --unet-steps 300 --inpaint-steps 200 --unet-batch 16 --pool 512 --threads 1",
)
WEIGHTS_SHA256 = "95e37fff7a6ce1a8993aa73de06fe8cd6c44a4054beae097157e693720ce14b0"
# which built-ins take trained weights, and the prefix of their UNet in the weights file
TRAINED_UNETS = {"tiny": "unet.tiny.", "tiny-inpaint": "unet.tiny-inpaint."}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack_weights(vae, text_encoder, unets: dict) -> dict[str, torch.Tensor]:
    """One flat tensor dict: ``vae.*``, ``text_encoder.*``, ``unet.<built-in name>.*``."""
    out = {f"vae.{k}": v for k, v in vae.state_dict().items()}
    out.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    for name, unet in unets.items():
        out.update({f"{TRAINED_UNETS[name]}{k}": v for k, v in unet.state_dict().items()})
    # fp16 on disk (a few MB); loading copies the values into the fp32 models
    return {k: (v.half() if v.is_floating_point() else v).detach().contiguous() for k, v in out.items()}


def load_trained_weights(pipe, name: str, path: Path | None = None) -> None:
    """Put the shipped weights of built-in `name` into `pipe` (checking the file's sha256)."""
    from safetensors import safe_open

    path = path or WEIGHTS_DIR / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall mimicshield, or rebuild it with "
                                "`python -m pipeline.builtin_training --out DIR`")
    if path == WEIGHTS_DIR / WEIGHTS_NAME and sha256(path) != WEIGHTS_SHA256:
        raise ValueError(f"{path} does not match its recorded sha256 {WEIGHTS_SHA256} (corrupt or replaced)")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        scale = float(f.metadata()["scaling_factor"])

    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    pipe.vae.load_state_dict(part("vae."))
    pipe.text_encoder.load_state_dict(part("text_encoder."), strict=False)  # position_ids may be a buffer
    pipe.unet.load_state_dict(part(TRAINED_UNETS[name]))
    pipe.vae.register_to_config(scaling_factor=scale)


# --------------------------------------------------------------------------- build + save


def scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**dict(_SCHEDULER, prediction_type=prediction_type))


def random_parts(name: str) -> dict:
    """The parts of built-in `name` with seeded random weights: vae, unet, text_encoder, tokenizer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CONFIGS[name]
    tokenizer = build_tokenizer()
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**cfg["vae"])
    unet = UNet2DConditionModel(**cfg["unet"])
    text_cfg = CLIPTextConfig(
        **{"vocab_size": len(tokenizer), **cfg["text"]},  # the SD configs name CLIP's 49408
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return {"vae": vae, "unet": unet, "text_encoder": CLIPTextModel(text_cfg), "tokenizer": tokenizer}


def _build_pipeline(name: str):
    from diffusers import StableDiffusionPipeline

    cfg = CONFIGS[name]
    pipe = StableDiffusionPipeline(
        **random_parts(name),
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if name in TRAINED_UNETS:
        load_trained_weights(pipe, name)
    return pipe if cfg["dtype"] == torch.float32 else pipe.to(dtype=cfg["dtype"])


def builtin_model_path(name: str) -> Path:
    """Directory of built-in model `name` in diffusers format, assembled on first use."""
    if name not in CONFIGS:
        raise KeyError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTIN_MODELS)}")
    target = cache_root() / f"{name}-{BUILTIN_VERSION}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _build_pipeline(name).save_pretrained(tmp, safe_serialization=True)
        try:
            tmp.rename(target)  # atomic: concurrent builders (Ray actors) cannot half-write
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
