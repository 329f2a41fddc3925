"""What every mimicry scenario shares: image <-> tensor conversion, seeds, and diffusers pipelines.

A mimic sees images at one working resolution, ``resolution`` (the model's native size by default:
512 for SD 1.5, 64 for the built-in ``tiny``), prepared as the fine-tuning scripts prepare them: the
shorter side resized to it, then the centre square (diffusers' ``Resize`` + ``CenterCrop``; the aspect
is kept, never squashed). The metrics compare outputs with references prepared the same way
(`metrics/mimicry.py`). Outputs are uint8 arrays at that size.

Pipelines are plain diffusers pipelines loaded from the model's directory (``models.path``),
safety checker off, progress bars off; an SDXL, SD3 or FLUX model (its model_index.json names the
pipeline) gets that family's pipeline of the same kind (`PIPELINE_CLASSES`). The diffusers pipelines follow the scheduler's
``prediction_type`` (eps or v) themselves; what we write by hand uses models.prediction_target
and models.predicted_original.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.io.images import center_crop_resize, from_batch, to_batch
from pipeline.models.diffusion import (
    FLUX_GUIDANCE,
    denoiser_family,
    t5_sequence_length,
)
from pipeline.models.loading import (
    ModelSpec,
    family_of_class,
    pipeline_class_name,
    pretrained_source,
    resolve_device,
    resolve_dtype,
)
from pipeline.seeds import key_seed


@dataclass
class MimicOutput:
    """One mimic output set: `images` (uint8 H x W x 3) produced under `setting` from `source` inputs."""

    scenario: str
    setting: str  # e.g. "one_step/s=0.10", "ddim50/s=0.30", "center", "steps=200"
    source: str  # "protected" or "clean"
    keys: list[str]
    images: list[np.ndarray]
    seconds: float = 0.0


def mimic_seed(seed: int, key: str) -> int:
    """The seed of the mimic output keyed `key` (an input's key, or "<scenario>/<group>/<i>" for generated image i)."""
    return key_seed(seed, key, "mimic")


def generators(seed: int, keys: list[str], device: torch.device) -> list[torch.Generator]:
    gen_device = "cpu" if device.type == "mps" else device
    return [torch.Generator(device=gen_device).manual_seed(mimic_seed(seed, k)) for k in keys]


# the diffusers pipeline class of each family and kind (None: the family has no such pipeline)
PIPELINE_CLASSES = {
    "sd": {"text2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
           "inpaint": "StableDiffusionInpaintPipeline"},
    "sdxl": {"text2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
             "inpaint": "StableDiffusionXLInpaintPipeline"},
    "sd3": {"text2img": "StableDiffusion3Pipeline", "img2img": "StableDiffusion3Img2ImgPipeline",
            "inpaint": "StableDiffusion3InpaintPipeline"},
    "flux": {"text2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"},
}


def denoiser(pipe):
    """The pipeline's denoiser: its UNet, or the transformer of an SD3 / FLUX pipeline."""
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def is_flow_pipeline(pipe) -> bool:
    return denoiser_family(denoiser(pipe)) != "unet"


def native_resolution(pipe) -> int:
    """The side the model was trained at: denoiser sample_size x VAE factor; FLUX's transformer has none: its VAE's."""
    sample_size = getattr(denoiser(pipe).config, "sample_size", None)
    if sample_size is None:
        return int(pipe.vae.config.sample_size)
    return int(sample_size) * int(pipe.vae_scale_factor)


def pipeline_guidance(pipe, guidance_scale: float) -> float:
    """The guidance_scale to give `pipe`: `guidance_scale` (classifier-free guidance), except for a FLUX model with a
    guidance embedding (FLUX.1-dev), which has no classifier-free guidance: its guidance_scale is an input the
    transformer was distilled at, used at its default (FLUX_GUIDANCE, 3.5) as a mimic would."""
    net = denoiser(pipe)
    if denoiser_family(net) == "flux" and net.config.guidance_embeds:
        return FLUX_GUIDANCE
    return guidance_scale


def flow_pipeline_kwargs(pipe) -> dict:
    """What a flow pipeline call needs to condition as `text_conditioning` does: T5's sequence length."""
    if not is_flow_pipeline(pipe):
        return {}
    t5 = pipe.tokenizer_3 if getattr(pipe, "tokenizer_3", None) is not None else pipe.tokenizer_2
    return {"max_sequence_length": t5_sequence_length(t5, denoiser_family(denoiser(pipe)))}


def mimic_view(rgb: np.ndarray, size: int) -> np.ndarray:
    """An image as a mimic at `size` sees it: shorter side to `size`, centre crop (io/images.center_crop_resize)."""
    return center_crop_resize(rgb, size)


def to_pil(images: list[np.ndarray], size: int) -> list[Image.Image]:
    return [Image.fromarray(mimic_view(img, size)) for img in images]


def to_model_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """A batch as the mimic's VAE takes it: each image's mimic view, N x 3 x size x size in [-1, 1], float32 on CPU."""
    return to_batch([mimic_view(img, size) for img in images], "signed")


def to_uint8(images) -> list[np.ndarray]:
    """diffusers `output_type="np"` (N x H x W x 3 in [0, 1]) or a tensor in [-1, 1] -> uint8 arrays."""
    return from_batch(images, signed=isinstance(images, torch.Tensor))


def pipeline_family(pipe) -> str:
    """"sd", "sdxl", "sd3" or "flux": the family of a loaded pipeline, from its class (models.loading.family_of_class)."""
    return family_of_class(type(pipe).__name__)


def vae_dtype(pipe, dtype: torch.dtype) -> torch.dtype:
    """The dtype the pipeline's VAE should encode in: float32 where an fp16 VAE overflows (SDXL's, SD3's and FLUX's
    configs say force_upcast, as their pipelines do), else `dtype`."""
    upcast = (dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False)
              and pipeline_family(pipe) != "sd")
    return torch.float32 if upcast else dtype


def load_pipeline(kind: str, model: "str | ModelSpec", device="auto", dtype="auto"):
    """A diffusers pipeline of `kind` ("text2img", "img2img", "inpaint") from a model name, directory or hub id,
    or a `ModelSpec` (whose revision is honoured), on `device` in `dtype`."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model_path, source = pretrained_source(model)
    family = model_family(model_path, source.get("revision"))
    cls = getattr(diffusers, PIPELINE_CLASSES[family][kind])
    if family == "sdxl":  # their VAE is upcast to fp32 for decoding when its config says force_upcast
        pipe = cls.from_pretrained(model_path, dtype=dtype, add_watermarker=False, **source)
    elif family in ("sd3", "flux"):
        pipe = cls.from_pretrained(model_path, dtype=dtype, **source)
    else:
        pipe = cls.from_pretrained(
            model_path, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **source
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def model_family(model_path: str, revision: str | None = None) -> str:
    """"sd", "sdxl", "sd3" or "flux": the family of the model at `model_path` (directory or hub id)."""
    from pathlib import Path

    local = Path(model_path).expanduser()
    try:
        return family_of_class(pipeline_class_name(str(local) if local.is_dir() else model_path, revision,
                                                   is_local=local.is_dir()))
    except Exception:  # unreachable hub: from_pretrained will say so with the real error
        return "sd"


