"""Inpainting mimicry: repaint a masked region of an image, keeping (and reading) the rest.

diffusers' `StableDiffusionInpaintPipeline` on an inpainting model (a 9-channel UNet: noisy
latent, mask, masked-image latent; the built-in ``tiny-inpaint`` for tests, e.g.
``stable-diffusion-v1-5/stable-diffusion-inpainting`` for real use). Masks come from the
sample's metadata or are generated (see masks.py); the mask of one key is the same for its
protected and its clean copy, and so is the noise (seeded by key).

Reference settings (Diff-Protect): 100 steps, guidance 7.5. Defaults here are the same; use
fewer steps on CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.evaluate.mimic.common import (
    MimicOutput,
    flow_pipeline_kwargs,
    generators,
    is_flow_pipeline,
    load_pipeline,
    native_resolution,
    pipeline_guidance,
    to_pil,
    to_uint8,
)
from pipeline.evaluate.mimic.masks import MASK_MODES, make_mask
from pipeline.io.images import center_crop_resize
from pipeline.models.loading import ModelSpec
from pipeline.seeds import key_seed


@dataclass
class InpaintConfig:
    masks: tuple[str, ...] = ("meta", "center", "random")  # "meta" skips samples without a mask
    steps: int = 100
    guidance_scale: float = 7.5
    strength: float = 1.0
    prompt: str = "a photo"
    seed: int = 0
    center_fraction: float = 0.5
    random_boxes: int = 3
    resolution: int | None = None
    batch_size: int = 8

    def __post_init__(self):
        bad = [m for m in self.masks if m not in MASK_MODES]
        if bad:
            raise ValueError(f"unknown mask mode(s) {bad}; choose from {', '.join(MASK_MODES)}")


class Inpaint:
    """Inpaints batches of uint8 images; the model is loaded once (one per Ray actor)."""

    scenario = "inpaint"

    def __init__(self, model: "str | ModelSpec", config: InpaintConfig | None = None, device="auto", dtype="auto"):
        self.config = config or InpaintConfig()
        self.pipe = load_pipeline("inpaint", model, device, dtype)
        # SD3 and FLUX inpaint with their base transformer (StableDiffusion3InpaintPipeline, FluxInpaintPipeline)
        if not is_flow_pipeline(self.pipe) and self.pipe.unet.config.in_channels != 9:
            raise ValueError(
                f"{getattr(model, 'model', model)} is not an inpainting model (its UNet takes {self.pipe.unet.config.in_channels} "
                "channels, inpainting needs 9); pass an inpainting model, e.g. tiny-inpaint"
            )
        self.resolution = self.config.resolution or native_resolution(self.pipe)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def masks_for(self, mode: str, images: list[np.ndarray], keys: list[str], metas: list[dict | None]):
        """The mask of each image for `mode` (None where mode "meta" finds none)."""
        cfg = self.config
        return [
            make_mask(mode, img.shape[0], img.shape[1], meta=meta, seed=key_seed(cfg.seed, key, "mimic"),
                      center_fraction=cfg.center_fraction, random_boxes=cfg.random_boxes)
            for img, key, meta in zip(images, keys, metas)
        ]

    def run(self, images: list[np.ndarray], keys: list[str], source: str, prompts=None, metas=None,
            ) -> list[MimicOutput]:
        """One `MimicOutput` per mask mode (modes for which no image has a mask are left out)."""
        cfg = self.config
        prompts = [p or cfg.prompt for p in (prompts or [None] * len(images))]
        metas = metas or [None] * len(images)
        outputs = []
        for mode in cfg.masks:
            masks = self.masks_for(mode, images, keys, metas)
            idx = [i for i, m in enumerate(masks) if m is not None]
            if not idx:
                continue
            start = time.perf_counter()
            painted: list[np.ndarray] = []
            for b in range(0, len(idx), cfg.batch_size):
                chunk = idx[b : b + cfg.batch_size]
                painted += self.inpaint([images[i] for i in chunk], [masks[i] for i in chunk],
                                        [keys[i] for i in chunk], [prompts[i] for i in chunk])
            outputs.append(MimicOutput(self.scenario, mode, source, [keys[i] for i in idx], painted,
                                       time.perf_counter() - start))
        return outputs

    @torch.no_grad()
    def inpaint(self, images, masks, keys, prompts) -> list[np.ndarray]:
        cfg, size = self.config, self.resolution
        mask_images = [Image.fromarray(center_crop_resize(m, size, Image.NEAREST)) for m in masks]  # as the image
        out = self.pipe(
            prompt=list(prompts),
            image=to_pil(images, size),
            mask_image=mask_images,
            height=size,
            width=size,
            strength=cfg.strength,
            num_inference_steps=cfg.steps,
            guidance_scale=pipeline_guidance(self.pipe, cfg.guidance_scale),
            generator=generators(cfg.seed, keys, self.device),
            output_type="np",
            **flow_pipeline_kwargs(self.pipe),
        ).images
        return to_uint8(out)
