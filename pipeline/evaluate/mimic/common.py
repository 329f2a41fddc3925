"""What every mimicry scenario shares: image <-> tensor conversion, seeds, and diffusers pipelines.

A mimic sees images at one working resolution, ``resolution`` (the model's native size by default:
512 for SD 1.5, 64 for the built-in ``tiny``), prepared as the fine-tuning scripts prepare them: the
shorter side resized to it, then the centre square (diffusers' ``Resize`` + ``CenterCrop``; the aspect
is kept, never squashed). The metrics compare outputs with references prepared the same way
(`metrics/mimicry.py`). Outputs are uint8 arrays at that size.

Pipelines are plain diffusers pipelines loaded from the model's directory (``models.path``),
safety checker off, progress bars off; an SDXL model (its model_index.json names an SDXL pipeline)
gets the SDXL pipeline of the same kind. The diffusers pipelines follow the scheduler's
``prediction_type`` (eps or v) themselves; what we write by hand uses models.prediction_target
and models.predicted_original.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.io.images import center_crop_resize
from pipeline.models.diffusion import encode_text, sdxl_time_ids, text_parts
from pipeline.models.loading import (
    ModelSpec,
    is_sdxl_class,
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


def native_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def mimic_view(rgb: np.ndarray, size: int) -> np.ndarray:
    """An image as a mimic at `size` sees it: shorter side to `size`, centre crop (io/images.center_crop_resize)."""
    return center_crop_resize(rgb, size)


def to_pil(images: list[np.ndarray], size: int) -> list[Image.Image]:
    return [Image.fromarray(mimic_view(img, size)) for img in images]


def to_model_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """A batch in [-1, 1], N x 3 x size x size, float32 on CPU."""
    arr = np.stack([mimic_view(img, size) for img in images]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def to_uint8(images) -> list[np.ndarray]:
    """diffusers `output_type="np"` (N x H x W x 3 in [0, 1]) or a tensor in [-1, 1] -> uint8 arrays."""
    if isinstance(images, torch.Tensor):
        images = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    return [np.round(np.clip(img, 0, 1) * 255).astype(np.uint8) for img in images]


def load_pipeline(kind: str, model: "str | ModelSpec", device="auto", dtype="auto"):
    """A diffusers pipeline of `kind` ("text2img", "img2img", "inpaint") from a model name, directory or hub id,
    or a `ModelSpec` (whose revision is honoured), on `device` in `dtype`."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model_path, source = pretrained_source(model)
    if is_sdxl_model(model_path, source.get("revision")):
        classes = {
            "text2img": diffusers.StableDiffusionXLPipeline,
            "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
            "inpaint": diffusers.StableDiffusionXLInpaintPipeline,
        }  # their VAE is upcast to fp32 for decoding when its config says force_upcast
        pipe = classes[kind].from_pretrained(model_path, dtype=dtype, add_watermarker=False, **source)
    else:
        classes = {
            "text2img": diffusers.StableDiffusionPipeline,
            "img2img": diffusers.StableDiffusionImg2ImgPipeline,
            "inpaint": diffusers.StableDiffusionInpaintPipeline,
        }
        pipe = classes[kind].from_pretrained(
            model_path, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **source
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def is_sdxl_model(model_path: str, revision: str | None = None) -> bool:
    """Whether the model at `model_path` (directory or hub id) is an SDXL model."""
    from pathlib import Path

    local = Path(model_path).expanduser()
    try:
        return is_sdxl_class(pipeline_class_name(str(local) if local.is_dir() else model_path, revision,
                                                 is_local=local.is_dir()))
    except Exception:  # unreachable hub: from_pretrained will say so with the real error
        return False


def is_sdxl_pipeline(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def text_conditioning(pipe, prompts: list[str], height: int, width: int) -> tuple[torch.Tensor, dict | None]:
    """(c, added_cond_kwargs) for `prompts` in the UNet's dtype, as the pipeline conditions its UNet (no guidance).

    `pipe`: a diffusers pipeline or anything with its parts (tokenizer(s), text encoder(s), unet).
    """
    embeds, pooled = encode_text(text_parts(pipe), prompts)
    dtype, device = pipe.unet.dtype, pipe.unet.device
    if pooled is None:
        return embeds.to(dtype), None
    return embeds.to(dtype), {"text_embeds": pooled.to(dtype),
                              "time_ids": sdxl_time_ids(height, width, len(prompts), device, dtype)}
