"""`diffpure:T`: noise the image's latent to t = T x 1000 and denoise it with the mimic's own model.

Source: DiffPure (Nie et al., ICML 2022), in latent space as GrIDPure / the "noisy upscaling"
line of work apply it to latent diffusion models (Zhao et al. 2024, Hönig et al. 2025):
z_t = sqrt(a_t) s E(x) + sqrt(1 - a_t) eps, then DDIM back to t = 0 with an empty prompt and no
guidance, decoded with the model's VAE. Runs diffusers' `StableDiffusionImg2ImgPipeline` at
strength T (T in (0, 1]); `PurifyContext.diffpure_steps` DDIM steps over the full schedule (at
least one step is always run). Seeded per (seed, key). Larger T: stronger purification.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from pipeline.evaluate.mimic.common import load_pipeline
from pipeline.io.images import resize_image
from pipeline.models.loading import model_path
from pipeline.study.purify.base import Purification


def img2img(context):
    """The context model's img2img pipeline with a DDIM scheduler (loaded once per context)."""

    def build():
        from diffusers import DDIMScheduler

        pipe = load_pipeline("img2img", model_path(context.model), context.device, context.dtype)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return pipe

    return context.get("img2img", build)


def fit(rgb: np.ndarray, multiple: int) -> Image.Image:
    """The image resized to sides that are multiples of `multiple` (unchanged when they already are)."""
    h, w = rgb.shape[:2]
    size = (max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple))
    return Image.fromarray(resize_image(rgb, (size[1], size[0])))


def back(out: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """A float [0, 1] output back to uint8 at the input's size."""
    img = Image.fromarray(np.round(np.clip(out, 0, 1) * 255).astype(np.uint8))
    h, w = rgb.shape[:2]
    return resize_image(np.asarray(img), (h, w))


def denoise(pipe, images, strength: float, steps: int, seeds: list[int], output_type: str = "np"):
    """DiffPure on images of one size: noise each latent to t = strength x 1000, DDIM back (empty prompt, no
    guidance) with `steps` steps over the full schedule (at least one is run), image i seeded by seeds[i].

    `images`: PIL images (encoded by the pipeline), or scaled latents s E(x) (N x C x h x w) taken as they
    are; `output_type` "np" gives N x H x W x 3 floats in [0, 1], "latent" the denoised latents.
    The one img2img call of diffpure and gridpure."""
    import torch

    steps = max(steps, math.ceil(1 / strength))
    device = "cpu" if pipe.device.type == "mps" else pipe.device
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    return pipe(prompt=[""] * len(images), image=images, strength=strength, num_inference_steps=steps,
                guidance_scale=1.0, generator=gens, output_type=output_type).images


class DiffPure(Purification):
    name = "diffpure"
    needs_model = True

    def check(self):
        if not 0 < self.param <= 1:
            raise ValueError(f"diffpure:T needs T in (0, 1] (a fraction of the 1000 timesteps), got {self.param:g}")

    def one(self, rgb, seed, context):
        pipe = img2img(context)
        out = denoise(pipe, [fit(rgb, pipe.vae_scale_factor * 2)], self.param, context.diffpure_steps, [seed])[0]
        return back(out, rgb)


UNIT = DiffPure
