"""`noisy_upscale:SIGMA`: Gaussian noise, downscale x4, then a diffusers x4 upscaler back to full size.

Source: Hönig et al., "Adversarial perturbations cannot reliably protect artists from generative
AI" (ICLR 2025), noisy upscaling: noise with sigma = 0.1 ([0, 1] units), then Stable Diffusion's
x4 upscaler (`stabilityai/stable-diffusion-x4-upscaler`), which removes the noise together with
the perturbation. The upscaler is `PurifyContext.upscaler` (`--upscaler PATH`: a local diffusers
`StableDiffusionUpscalePipeline` directory or hub id); without one, the built-in `tiny-upscaler`
(same architecture, random weights) exercises the code. Empty prompt, no guidance, the
pipeline's default noise level (20), `PurifyContext.upscaler_steps` steps. Seeded per (seed, key).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.models.loading import resolve_device, resolve_dtype
from pipeline.study.purify.base import Purification
from pipeline.study.purify.builtin_upscaler import builtin_upscaler_path
from pipeline.study.purify.diffpure import back

FACTOR = 4


def upscaler(context):
    def build():
        import diffusers
        from diffusers import StableDiffusionUpscalePipeline

        path = context.upscaler or str(builtin_upscaler_path())
        device = resolve_device(context.device)
        diffusers.utils.logging.disable_progress_bar()
        pipe = StableDiffusionUpscalePipeline.from_pretrained(path, dtype=resolve_dtype(context.dtype, device))
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    return context.get("upscaler", build)


class NoisyUpscale(Purification):
    name = "noisy_upscale"
    needs_model = True

    def check(self):
        if self.param < 0:
            raise ValueError(f"noisy_upscale:SIGMA needs sigma >= 0, got {self.param:g}")

    def one(self, rgb, seed, context):
        import torch

        pipe = upscaler(context)
        noisy = np.clip(rgb.astype(np.float64) + np.random.default_rng(seed).normal(0, self.param * 255, rgb.shape),
                        0, 255)
        h, w = rgb.shape[:2]
        small = (max(8, round(w / FACTOR / 8) * 8), max(8, round(h / FACTOR / 8) * 8))  # the UNet's multiple
        low = Image.fromarray(np.round(noisy).astype(np.uint8)).resize(small, Image.BICUBIC)
        gen = torch.Generator(device="cpu" if pipe.device.type == "mps" else pipe.device).manual_seed(seed)
        out = pipe(prompt="", image=low, num_inference_steps=context.upscaler_steps, guidance_scale=1.0,
                   generator=gen, output_type="np").images[0]
        return back(out, rgb)


UNIT = NoisyUpscale
