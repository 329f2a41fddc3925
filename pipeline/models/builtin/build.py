"""Built-in Stable Diffusion models, for tests, benchmarks and the demo (nothing is downloaded).

Each built-in model is assembled from a config (below) and, for the trained ones, weights
shipped in this package; it is saved once in diffusers format (safetensors) to a cache
directory and from then on loaded through the very same `from_pretrained` path as a real
checkpoint.

- ``tiny``         an SD 1.x-shaped latent diffusion model small enough for CPU, *trained* on
                   scikit-image's bundled photos by `pipeline.train.tiny` (weights in
                   ``pipeline/models/builtin/weights/``, sha256 checked on load): its VAE (1/8 downsampling,
                   4 latent channels, like SD's) reconstructs held-out photos, its latent scale is
                   calibrated (1/std of latents, as SD's 0.18215 is) and its UNet denoises those
                   latents conditioned on the text encoder (random, seeded, frozen; shipped too).
                   Small enough to measure whether a protection hurts a mimic; not a real model.
- ``tiny-inpaint`` the same VAE and text encoder with a 9-channel UNet trained to inpaint.
- ``tiny-style``   the style world's model (``pipeline/data/styles.py``, trained by
                   ``pipeline/train/style.py``): tiny's VAE fine-tuned on painted renders too, a UNet and
                   text encoder that paint 24 named styles ("a painting in the style of <name>"); what the
                   LoRA and textual-inversion mimics learn a held-out artist on.
- ``sd15-arch``    the real SD 1.5 architecture with random weights (speed/memory benchmarks).
- ``sd21-arch``    the real SD 2.1-base architecture with random weights.

Model coverage (v-prediction, SDXL), in their own blocks below. The tiny variants' UNets had a quick
recipe (`pipeline/train/coverage.py`: 200 seeded steps) and ship as weights like the others; `tiny-v` on
``tiny``'s trained VAE, `tiny-xl` on a VAE of its own (see `_build_pipeline`):
- ``tiny-v``          ``tiny`` with a v-prediction scheduler, its UNet trained to predict
                      v = sqrt(a_t) eps - sqrt(1 - a_t) z0.
- ``tiny-xl``         SDXL-shaped and small: two text encoders (the second with a projection, whose
                      pooled output conditions the UNet with the size time ids), ``text_time``
                      added embedding, a VAE of its own seed with ``force_upcast``. ``tiny-xl-inpaint`` is its 9-channel inpainting twin.
- ``sd21-768-arch``   the real SD 2.1 (768 x 768, v-prediction) architecture, random weights.
- ``sdxl-arch``       the real SDXL base architecture, random weights (about 7 GB in fp16; built in
                      fp16 directly, so building needs about that much memory, not 4x).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import torch

from pipeline.io.files import cache_root
from pipeline.seeds import seeded_global_rng

BUILTIN_VERSION = "v6"  # bump when a config below changes, so caches are rebuilt
SEED = 0


def models_cache_dir() -> Path:
    """Where built-in models are built once and loaded from: $MIMICSHIELD_CACHE/models."""
    return cache_root() / "models"


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

_SD_UNET = dict(  # SD 1.x / 2.x UNet blocks; each architecture adds its attention settings
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    sample_size=64,
)


def _clip_text(hidden: int, intermediate: int, layers: int, heads: int, projection: int, act: str,
               vocab: int | None = None) -> dict:
    """A CLIP text encoder's config (77 positions, as every SD text encoder)."""
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                max_position_embeddings=77, projection_dim=projection, hidden_act=act,
                **({"vocab_size": vocab} if vocab else {}))


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
        text=_clip_text(32, 64, layers=2, heads=4, projection=32, act="quick_gelu"),
        dtype=torch.float32,
    ),
    "sd15-arch": dict(
        vae=_SD_VAE,
        unet=dict(_SD_UNET, cross_attention_dim=768, attention_head_dim=8),
        text=_clip_text(768, 3072, layers=12, heads=12, projection=768, act="quick_gelu", vocab=49408),  # CLIP ViT-L/14
        dtype=torch.float16,  # random weights: store them small, load in any dtype
    ),
    "sd21-arch": dict(
        vae=_SD_VAE,
        unet=dict(_SD_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
        text=_clip_text(1024, 4096, layers=23, heads=16, projection=512, act="gelu", vocab=49408),  # OpenCLIP ViT-H/14
        dtype=torch.float16,
    ),
}
CONFIGS["tiny-inpaint"] = dict(CONFIGS["tiny"], unet=dict(CONFIGS["tiny"]["unet"], in_channels=9))

# --------------------------------------------------------------------------- the style world (issue 20)
# ``tiny-style``: tiny's VAE fine-tuned on the style world's renders as well as photos, and a UNet (cross-
# attention at both levels, wider) and text encoder trained together on captions such as "a painting in the
# style of <name>" for the 24 training styles of `styles.py` and "a photo of <content>": a prompt names a
# style and the model paints it; LoRA and textual inversion can learn the 8 held-out ones.
CONFIGS["tiny-style"] = dict(
    CONFIGS["tiny"],
    unet=dict(CONFIGS["tiny"]["unet"], down_block_types=["CrossAttnDownBlock2D"] * 2,
              up_block_types=["CrossAttnUpBlock2D"] * 2, block_out_channels=[48, 96]),
)

# --------------------------------------------------------------------------- v-prediction (issue 14)
# A config may override scheduler fields (`scheduler=`); `prediction_type` then decides what the
# quick training recipe (pipeline/train/coverage.py) and every loss in the package compare the UNet with.

CONFIGS["tiny-v"] = dict(CONFIGS["tiny"], scheduler=dict(prediction_type="v_prediction"))
CONFIGS["sd21-768-arch"] = dict(  # stabilityai/stable-diffusion-2-1: 768 px, v-prediction
    CONFIGS["sd21-arch"],
    vae=dict(_SD_VAE, sample_size=768),
    unet=dict(CONFIGS["sd21-arch"]["unet"], sample_size=96),
    scheduler=dict(prediction_type="v_prediction"),
)

# --------------------------------------------------------------------------- SDXL (issue 14)
# `family="sdxl"`: two text encoders (`text`: CLIPTextModel, `text_2`: CLIPTextModelWithProjection),
# UNet `addition_embed_type="text_time"` with
#     projection_class_embeddings_input_dim = text_2.projection_dim + 6 * addition_time_embed_dim
# (pooled text embedding + six size ids), cross_attention_dim = text.hidden + text_2.hidden.

_TINY_XL_TEXT = _clip_text(32, 64, layers=2, heads=4, projection=32, act="gelu")
CONFIGS["tiny-xl"] = dict(
    family="sdxl",
    seed=1,  # weights of its own (SDXL's VAE is not SD's): transfer from tiny goes through another encoder
    vae=dict(CONFIGS["tiny"]["vae"], scaling_factor=0.13025, force_upcast=True),  # calibrated in training
    unet=dict(
        in_channels=4,
        out_channels=4,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],  # as SDXL: no attention at full size
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[32, 64],
        layers_per_block=1,
        attention_head_dim=4,
        use_linear_projection=True,
        cross_attention_dim=64,  # 32 + 32
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 32 + 6 * 8
        norm_num_groups=8,
        sample_size=8,
    ),
    text=dict(_TINY_XL_TEXT, hidden_act="quick_gelu"),
    text_2=_TINY_XL_TEXT,
    dtype=torch.float32,
)
CONFIGS["tiny-xl-inpaint"] = dict(CONFIGS["tiny-xl"], unet=dict(CONFIGS["tiny-xl"]["unet"], in_channels=9))
CONFIGS["sdxl-arch"] = dict(  # stabilityai/stable-diffusion-xl-base-1.0, random weights
    family="sdxl",
    vae=dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    unet=dict(
        in_channels=4,
        out_channels=4,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[320, 640, 1280],
        layers_per_block=2,
        attention_head_dim=[5, 10, 20],
        transformer_layers_per_block=[1, 2, 10],
        use_linear_projection=True,
        cross_attention_dim=2048,  # 768 + 1280
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 1280 + 6 * 256
        sample_size=128,
    ),
    text=_clip_text(768, 3072, layers=12, heads=12, projection=768, act="quick_gelu", vocab=49408),  # CLIP ViT-L/14
    text_2=_clip_text(1280, 5120, layers=32, heads=20, projection=1280, act="gelu", vocab=49408),  # OpenCLIP bigG/14
    dtype=torch.float16,
    init_dtype=torch.float16,  # 3.5 B parameters: initialise in fp16 (7 GB), never in fp32 (14 GB)
)

# --------------------------------------------------------------------------- flow matching (issue 21)
# `family="sd3"` / `"flux"`: rectified-flow models. A 16-channel VAE whose latents are z = s (E(x) - shift)
# (`scaling_factor`, `shift_factor`), a transformer denoiser trained on the velocity v = eps - z0, a
# FlowMatchEulerDiscreteScheduler (`scheduler=` fields), and text encoders as the real ones:
#   sd3    CLIP-L and CLIP-G with projections (`text`, `text_2`) + T5 (`t5`): c = [pad(CLIP states); T5 states],
#          pooled = both projections: joint_attention_dim = t5.d_model >= text.hidden + text_2.hidden,
#          pooled_projection_dim = text.projection + text_2.projection
#   flux   CLIP-L (`text`, pooled output) + T5 (`t5`): joint_attention_dim = t5.d_model,
#          pooled_projection_dim = text.hidden; latents packed 2 x 2 (in_channels = 4 x 16); guidance embedding
# The tiny ones take their VAE from tiny's trained one, widened to 16 channels and fine-tuned (pipeline/train/flow.py).

_TINY_FLOW_VAE = dict(CONFIGS["tiny"]["vae"], latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
_TINY_T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=8, relative_attention_max_distance=32)
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               feed_forward_proj="gated-gelu")  # google/t5-v1_1-xxl, the encoder of SD3 and FLUX.1
_FLOW_VAE = dict(_SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
CONFIGS["tiny-sd3"] = dict(
    family="sd3",
    seed=2,
    vae=dict(_TINY_FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609),  # SD3's; calibrated in training
    transformer=dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                     attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                     caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=16),
    text=_clip_text(32, 64, layers=2, heads=4, projection=32, act="quick_gelu"),
    text_2=_clip_text(32, 64, layers=2, heads=4, projection=32, act="gelu"),
    t5=_TINY_T5,
    scheduler=dict(num_train_timesteps=1000, shift=3.0),  # stabilityai/stable-diffusion-3-medium's
    dtype=torch.float32,
)
CONFIGS["tiny-flux"] = dict(
    family="flux",
    seed=3,
    vae=dict(_TINY_FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1's; calibrated in training
    transformer=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                     num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                     axes_dims_rope=(4, 6, 6)),
    text=_clip_text(32, 64, layers=2, heads=4, projection=32, act="quick_gelu"),
    t5=_TINY_T5,
    scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                   base_image_seq_len=256, max_image_seq_len=4096),  # black-forest-labs/FLUX.1-dev's
    dtype=torch.float32,
)
CONFIGS["sd35-arch"] = dict(  # stabilityai/stable-diffusion-3.5-large, random weights (meta device: never built)
    family="sd3",
    vae=dict(_FLOW_VAE, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609),
    transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                     attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                     caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm"),
    text=_clip_text(768, 3072, layers=12, heads=12, projection=768, act="quick_gelu", vocab=49408),  # CLIP ViT-L/14
    text_2=_clip_text(1280, 5120, layers=32, heads=20, projection=1280, act="gelu", vocab=49408),  # OpenCLIP bigG/14
    t5=_T5_XXL,
    scheduler=dict(num_train_timesteps=1000, shift=3.0),
    dtype=torch.bfloat16,
    init_dtype=torch.bfloat16,
)
CONFIGS["flux-arch"] = dict(  # black-forest-labs/FLUX.1-dev, random weights (meta device: never built)
    family="flux",
    vae=dict(_FLOW_VAE, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159),
    transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                     axes_dims_rope=(16, 56, 56)),
    text=_clip_text(768, 3072, layers=12, heads=12, projection=768, act="quick_gelu", vocab=49408),
    t5=_T5_XXL,
    scheduler=CONFIGS["tiny-flux"]["scheduler"],
    dtype=torch.bfloat16,
    init_dtype=torch.bfloat16,
)
FLOW_FAMILIES = ("sd3", "flux")

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


T5_WORDS = ("a", "an", "of", "photo", "painting", "artwork", "anime", "picture", "landscape", "portrait", "style",
            "in", "the", "by", "sks")


def build_t5_tokenizer(max_length: int = 32):
    """A small SentencePiece-style (unigram) T5 tokenizer built here (no download): every ASCII letter,
    digit and punctuation mark is a piece (with and without the word-start mark), plus the words our
    prompts use; anything else is <unk>. `max_length` is its model_max_length (T5 tokens per prompt)."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0}
    for word in T5_WORDS:
        pieces["\u2581" + word] = -2.0
    pieces["\u2581"] = -3.0
    chars = string.ascii_letters + string.digits + string.punctuation
    for c in chars:
        pieces.setdefault(c, -5.0)
    for c in chars:
        pieces.setdefault("\u2581" + c, -5.5)
    tok = Tokenizer(models.Unigram(list(pieces.items()), unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


# --------------------------------------------------------------------------- trained weights

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_NAME = "tiny-v4.safetensors"  # made by `python -m pipeline.train.tiny` (seed 0)
# the three commands that made it (curve: benchmarks/results/builtin_tiny_curve.jsonl): the VAE on 32 px
# crops (cosine-decayed learning rate, EMA of its weights shipped: this alone was v3), a second VAE phase on
# recoloured 64 px crops (what took held-out PSNR from 19.6 to 22+ dB), then the UNets on its frozen latents
WEIGHTS_RECIPE = (
    "python -m pipeline.train.tiny --out A --vae-steps 6000 --vae-lr 2e-3 --vae-decay --vae-ema 0.999 "
    "--vae-eval-every 250 --vae-only --threads 1",
    "python -m pipeline.train.tiny --out A --vae-init A/vae-checkpoint.safetensors --vae-seed 1 "
    "--vae-steps 2000 --vae-lr 5e-4 --vae-decay --vae-ema 0.995 --vae-crop 64 --vae-batch 8 --vae-colour "
    "--vae-eval-every 100 --vae-only --threads 2",
    "python -m pipeline.train.tiny --out A --vae-init A/vae-checkpoint.safetensors --vae-steps 0 "
    "--unet-steps 800 --inpaint-steps 500 --unet-batch 16 --pool 1024 --threads 2",
)
WEIGHTS_SHA256 = "729cb23e1a25cd32acd4352c758f3d2e4e2760a386934d9dcdc53623bad67a0f"
# ``tiny-style`` (issue 20): made by `python -m pipeline.train.style` (seed 0, one core)
STYLE_WEIGHTS_NAME = "tiny-style-v1.safetensors"
STYLE_WEIGHTS_RECIPE = ("python -m pipeline.train.style --out A --vae-steps 1000 --unet-steps 3000 "
                        "--eval-every 750 --pool 4096 --threads 1",)
STYLE_WEIGHTS_SHA256 = "f50570d499ee63ba03859ee4a75aa735fa05fad7fb63c06c813d112a886d4691"
# ``tiny-sd3``, ``tiny-flux`` (issue 21): made by `python -m pipeline.train.flow` (seed 0, one core);
# the file holds their transformers, text encoders and fine-tuned VAE layers; the rest of their VAE is tiny's
FLOW_WEIGHTS_NAME = "tiny-flow-v1.safetensors"
FLOW_WEIGHTS_RECIPE = ("python -m pipeline.train.flow --out A --vae-steps 400 --vae-lr 1e-3 --steps 1500 "
                       "--threads 1",)
FLOW_WEIGHTS_SHA256 = "edea7f21caf857cc2339a337bc743acd2331d315e9c5fbb205671fce2e1ff52c"
# ``tiny-v``, ``tiny-xl``, ``tiny-xl-inpaint`` (issue 14; shipped since issue 34): made by
# `python -m pipeline.train.coverage` (seed 0, one core); their UNets and latent scales
COVERAGE_WEIGHTS_NAME = "tiny-coverage-v1.safetensors"
COVERAGE_WEIGHTS_RECIPE = ("python -m pipeline.train.coverage --out A --threads 1",)
COVERAGE_WEIGHTS_SHA256 = "7afd6f62d426f4b0cd3f127f03273e453c3d97aef781c8ffa30dcb0512048940"
COVERAGE_UNETS = ("tiny-v", "tiny-xl", "tiny-xl-inpaint")
# which built-ins take trained weights: the prefix of their UNet in the weights file, and that file
TRAINED_UNETS = {"tiny": "unet.tiny.", "tiny-inpaint": "unet.tiny-inpaint.", "tiny-style": "unet.tiny-style."}


def weights_file(name: str) -> tuple[str, str]:
    """(file name in WEIGHTS_DIR, recorded sha256) of a trained built-in's shipped weights."""
    return (STYLE_WEIGHTS_NAME, STYLE_WEIGHTS_SHA256) if name == "tiny-style" else (WEIGHTS_NAME, WEIGHTS_SHA256)


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


def checked_weights(path: Path | None, file_name: str, expected: str, script: str) -> Path:
    """`path`, or the shipped WEIGHTS_DIR/`file_name` checked against its recorded sha256 (`script`: the
    pipeline/train module that rebuilds it, named when the file is missing)."""
    path = path or WEIGHTS_DIR / file_name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall mimicshield, or rebuild it with "
                                f"`python -m pipeline.train.{script} --out DIR`")
    if path == WEIGHTS_DIR / file_name and sha256(path) != expected:
        raise ValueError(f"{path} does not match its recorded sha256 {expected} (corrupt or replaced)")
    return path


def load_trained_weights(pipe, name: str, path: Path | None = None) -> None:
    """Put the shipped weights of built-in `name` into `pipe` (checking the file's sha256)."""
    from safetensors import safe_open

    file_name, expected = weights_file(name)
    path = checked_weights(path, file_name, expected, "style" if name == "tiny-style" else "tiny")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        scale = float(f.metadata()["scaling_factor"])

    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    pipe.vae.load_state_dict(part("vae."))
    pipe.text_encoder.load_state_dict(part("text_encoder."), strict=False)  # position_ids may be a buffer
    pipe.unet.load_state_dict(part(TRAINED_UNETS[name]))
    pipe.vae.register_to_config(scaling_factor=scale)


FLOW_BUILTINS = ("tiny-sd3", "tiny-flux")


def _fold_1x1(conv_weight: torch.Tensor, conv_bias: torch.Tensor, q_weight: torch.Tensor, q_bias: torch.Tensor):
    """The 1x1 conv q after `conv`, as one conv: W' = Q W, b' = Q b + q."""
    q = q_weight[:, :, 0, 0]
    return torch.einsum("oj,jchw->ochw", q, conv_weight), q @ conv_bias + q_bias


@torch.no_grad()
def widen_vae(tiny_vae, vae, seed: int) -> None:
    """Put tiny's 4-channel VAE into the 16-channel `vae` of a flow built-in, in place: tiny's quant_conv folded
    into the encoder's output conv and its post_quant_conv into the decoder's input conv (exact up to the border
    pixels), the new encoder channels small and random (seeded), read by the decoder through zero weights
    (pipeline/train/flow.py fine-tunes from there; `load_flow_weights` starts from it too)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in tiny_vae.state_dict().items()
             if not k.startswith(("quant_conv.", "post_quant_conv.", "encoder.conv_out.", "decoder.conv_in."))}
    c_tiny, c = tiny_vae.config.latent_channels, vae.config.latent_channels
    w, b = _fold_1x1(tiny_vae.encoder.conv_out.weight, tiny_vae.encoder.conv_out.bias,
                     tiny_vae.quant_conv.weight, tiny_vae.quant_conv.bias)  # 2 c_tiny rows: mean, logvar
    enc_w = torch.zeros(2 * c, *w.shape[1:])
    enc_b = torch.zeros(2 * c)
    enc_w[:c_tiny], enc_b[:c_tiny] = w[:c_tiny], b[:c_tiny]
    enc_w[c_tiny:c] = 0.1 * w[:c_tiny].std() * torch.randn(c - c_tiny, *w.shape[1:], generator=gen)
    enc_w[c : c + c_tiny], enc_b[c : c + c_tiny] = w[c_tiny:], b[c_tiny:]
    enc_b[c + c_tiny :] = -6.0  # the new channels' posterior is narrow, as the trained ones' is
    p, p_b = tiny_vae.post_quant_conv.weight[:, :, 0, 0], tiny_vae.post_quant_conv.bias
    dec_w0, dec_b0 = tiny_vae.decoder.conv_in.weight, tiny_vae.decoder.conv_in.bias
    dec_w = torch.zeros(dec_w0.shape[0], c, *dec_w0.shape[2:])
    dec_w[:, :c_tiny] = torch.einsum("ojhw,ji->oihw", dec_w0, p)
    dec_b = dec_b0 + torch.einsum("ojhw,j->o", dec_w0, p_b)  # exact away from the zero-padded border
    state.update({"encoder.conv_out.weight": enc_w, "encoder.conv_out.bias": enc_b,
                  "decoder.conv_in.weight": dec_w, "decoder.conv_in.bias": dec_b})
    vae.load_state_dict(state)


def load_flow_weights(pipe, name: str, path: Path | None = None) -> None:
    """Put the shipped weights of flow built-in `name` into `pipe` (sha256 checked): tiny's trained VAE widened
    to 16 channels (`widen_vae`), then the file's fine-tuned VAE layers, latent shift and scale,
    transformer and text encoders."""
    from safetensors import safe_open

    path = checked_weights(path, FLOW_WEIGHTS_NAME, FLOW_WEIGHTS_SHA256, "flow")
    tiny = build_pipeline("tiny")
    load_trained_vae(tiny)
    widen_vae(tiny.vae, pipe.vae, CONFIGS[name]["seed"])
    with safe_open(str(path), framework="pt") as f:
        tensors = {k[len(name) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}
        meta = f.metadata()

    def part(prefix):
        return {k[len(prefix):]: v.float() if v.is_floating_point() else v
                for k, v in tensors.items() if k.startswith(prefix)}

    pipe.vae.load_state_dict({**pipe.vae.state_dict(), **part("vae.")})
    pipe.transformer.load_state_dict(part("transformer."))
    for module in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, module, None) is not None:
            getattr(pipe, module).load_state_dict(part(module + "."), strict=False)  # position_ids may be a buffer
    pipe.vae.register_to_config(shift_factor=float(meta[f"{name}.shift_factor"]),
                                scaling_factor=float(meta[f"{name}.scaling_factor"]))


# --------------------------------------------------------------------------- build + save


def scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**dict(_SCHEDULER, prediction_type=prediction_type))


class _default_dtype:
    """Create modules in `dtype` (random init straight in fp16 for the large random-weight models)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def _text_encoder(text: dict, tokenizer, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_cfg = CLIPTextConfig(
        **{"vocab_size": len(tokenizer), **text},  # the SD configs name CLIP's 49408
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(text_cfg)


def build_pipeline(name: str):
    """The diffusers pipeline of built-in `name`, freshly initialised with the fixed seed (not trained).

    Call it under ``torch.device("meta")`` to get the architecture without allocating weights.
    """
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    cfg = CONFIGS[name]
    if cfg.get("family") in FLOW_FAMILIES:
        return build_flow_pipeline(name)
    tokenizer = build_tokenizer()
    with seeded_global_rng(cfg.get("seed", SEED)), _default_dtype(cfg.get("init_dtype", torch.float32)):
        vae = AutoencoderKL(**cfg["vae"])
        unet = UNet2DConditionModel(**cfg["unet"])
        text_encoder = _text_encoder(cfg["text"], tokenizer)
        text_encoder_2 = _text_encoder(cfg["text_2"], tokenizer, with_projection=True) if "text_2" in cfg else None
    scheduler = DDPMScheduler(**{**_SCHEDULER, **cfg.get("scheduler", {})})
    if cfg.get("family") == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=build_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return pipe if cfg["dtype"] == torch.float32 else pipe.to(dtype=cfg["dtype"])


def _t5_encoder(t5: dict, tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**{"vocab_size": len(tokenizer), **t5}, dropout_rate=0.0, is_encoder_decoder=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return T5EncoderModel(config)


def build_flow_pipeline(name: str):
    """A flow-matching built-in (`family` sd3 or flux): StableDiffusion3Pipeline or FluxPipeline, seeded, untrained."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    cfg = CONFIGS[name]
    tokenizer, t5_tokenizer = build_tokenizer(), build_t5_tokenizer()
    with seeded_global_rng(cfg.get("seed", SEED)), _default_dtype(cfg.get("init_dtype", torch.float32)):
        vae = AutoencoderKL(**cfg["vae"])
        t5 = _t5_encoder(cfg["t5"], t5_tokenizer)
        if cfg["family"] == "sd3":
            transformer = SD3Transformer2DModel(**cfg["transformer"])
            clip_l = _text_encoder(cfg["text"], tokenizer, with_projection=True)
            clip_g = _text_encoder(cfg["text_2"], tokenizer, with_projection=True)
        else:
            transformer = FluxTransformer2DModel(**cfg["transformer"])
            clip_l = _text_encoder(cfg["text"], tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    if cfg["family"] == "sd3":
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip_l,
                                        tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=build_tokenizer(),
                                        text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    else:
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=t5,
                            tokenizer_2=t5_tokenizer, transformer=transformer)
    return pipe if cfg["dtype"] == torch.float32 else pipe.to(dtype=cfg["dtype"])


def load_coverage_weights(pipe, name: str, path: Path | None = None) -> None:
    """Put the shipped UNet and latent scale of coverage built-in `name` into `pipe` (sha256 checked); tiny-v's
    VAE is tiny's trained one, tiny-xl's the seeded random one `build_pipeline` made."""
    from safetensors import safe_open

    path = checked_weights(path, COVERAGE_WEIGHTS_NAME, COVERAGE_WEIGHTS_SHA256, "coverage")
    if name == "tiny-v":
        load_trained_vae(pipe)
    prefix = f"unet.{name}."
    with safe_open(str(path), framework="pt") as f:
        unet = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        scale = float(f.metadata()[f"scaling_factor.{name}"])
    pipe.unet.load_state_dict(unet)
    pipe.vae.register_to_config(scaling_factor=scale)


def random_parts(name: str) -> dict:
    """The parts of built-in `name` with seeded random weights: vae, unet, text_encoder, tokenizer."""
    pipe = build_pipeline(name)
    return {"vae": pipe.vae, "unet": pipe.unet, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}


def load_trained_vae(pipe, path: Path | None = None) -> None:
    """Put the shipped trained VAE of ``tiny`` (and its latent scale) into `pipe` (same VAE architecture)."""
    from safetensors import safe_open

    path = path or WEIGHTS_DIR / WEIGHTS_NAME
    if path == WEIGHTS_DIR / WEIGHTS_NAME and sha256(path) != WEIGHTS_SHA256:
        raise ValueError(f"{path} does not match its recorded sha256 {WEIGHTS_SHA256} (corrupt or replaced)")
    with safe_open(str(path), framework="pt") as f:
        vae = {k[len("vae."):]: f.get_tensor(k) for k in f.keys() if k.startswith("vae.")}
        scale = float(f.metadata()["scaling_factor"])
    pipe.vae.load_state_dict(vae)
    pipe.vae.register_to_config(scaling_factor=scale)


def _build_pipeline(name: str):
    """Built-in `name`, ready to save (seeded, once per cache):

    - tiny, tiny-inpaint: the shipped trained weights;
    - tiny-v: tiny's trained VAE and latent scale, and its shipped v-prediction UNet;
    - tiny-xl(-inpaint): a VAE of its own (seed 1, random; SDXL's VAE differs from SD's too, so transfer
      between tiny and tiny-xl measures another encoder), its shipped latent scale and UNet;
    - tiny-sd3, tiny-flux: tiny's VAE widened to 16 channels with the shipped fine-tuned layers, and the
      shipped transformer and text encoders (`load_flow_weights`);
    - the *-arch models: random weights.
    """
    pipe = build_pipeline(name)
    if name in FLOW_BUILTINS:
        load_flow_weights(pipe, name)
    elif name in TRAINED_UNETS:
        load_trained_weights(pipe, name)
    elif name in COVERAGE_UNETS:
        load_coverage_weights(pipe, name)
    return pipe


def announce_build(name: str, target: Path) -> None:
    """One line on stderr while a built-in is generated (the first run would otherwise sit silent)."""
    import sys

    print(f"mimicshield: generating built-in model {name} (first use, about a minute; kept in {target.parent})...",
          file=sys.stderr, flush=True)


class _no_save_progress_bar:
    """transformers' "Writing model shards" bar (text encoders) is noise next to `announce_build`'s line."""

    def __enter__(self):
        from transformers.utils import logging as tlog

        self.was_enabled = tlog.is_progress_bar_enabled()
        tlog.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as tlog

        if self.was_enabled:
            tlog.enable_progress_bar()


def builtin_model_path(name: str) -> Path:
    """Directory of built-in model `name` in diffusers format, assembled on first use."""
    if name not in CONFIGS:
        raise KeyError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTIN_MODELS)}")
    return cached_pipeline_dir(models_cache_dir() / f"{name}-{BUILTIN_VERSION}", lambda: _build_pipeline(name), name)


def cached_pipeline_dir(target: Path, build, name: str) -> Path:
    """`target`, a diffusers directory that `build()`'s pipeline is saved to once, atomically.

    The pipeline is saved into a temporary sibling and renamed into place, so concurrent builders
    (Ray actors, parallel tests) never see a half-written model; the loser of a race drops its copy.
    """
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    announce_build(name, target)
    try:
        pipe = build()
        with _no_save_progress_bar():
            pipe.save_pretrained(tmp, safe_serialization=True)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
