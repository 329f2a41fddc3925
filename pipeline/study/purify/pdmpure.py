"""`pdmpure:T`: PDM-Pure, SDEdit with a *pixel-space* diffusion model: noise the image to t = T x 1000, denoise.

Source: Xue et al., "Pixel is a Barrier: Diffusion Models Are More Adversarially Robust Than We Think"
(2024), PDM-Pure. Protections are crafted against a latent diffusion model's encoder; a pixel-space
diffusion model has no encoder to fool, and as a purifier it removes those perturbations far better
than the latent model's own DiffPure does. On the image x in [-1, 1] (eps-prediction shown; v and
x0 models go through models/diffusion.py `predicted_original`):

    x_t      = sqrt(abar_t) x + sqrt(1 - abar_t) eps,                 t = round(1000 T) - 1
    x0_hat   = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t),   clipped to [-1, 1]
    x_t'     = sqrt(abar_t') x0_hat + sqrt(1 - abar_t') eps_hat       DDIM, eta = 0 (Song et al. 2021, eq. 12)

over n = ceil(T x `PurifyContext.diffpure_steps`) evenly spaced timesteps from t down to 0, then
x0_hat of the last one. The pixel model is `PurifyContext.pixel_model` (`--pixel-model PATH`: a
diffusers `DDPMPipeline` directory or hub id, or a bare `UNet2DModel` directory, which then gets
DDPM's linear schedule); without one (or named `tiny-pixel`), the built-in `tiny-pixel`
(models/builtin/pixel.py: trained on the bundled photos, fully convolutional). The model runs on the image at its own size, padded by
reflection to the UNet's multiple (the paper runs DeepFloyd IF's pixel stage and guided diffusion at
their sizes; a user's model with attention costs memory quadratic in the pixels). Seeded per
(seed, key). Larger T: stronger purification.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.io.images import to_tensor, to_uint8
from pipeline.models.diffusion import predicted_original
from pipeline.models.loading import resolve_device, resolve_dtype
from pipeline.study.purify.base import Purification


def load_pixel_model(path: str | Path, device="auto", dtype="auto"):
    """(UNet2DModel, DDPM-family scheduler) from a `DDPMPipeline` directory or hub id, or a `UNet2DModel` directory."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "model_index.json").exists():
        unet = UNet2DModel.from_pretrained(str(local), dtype=dtype)
        scheduler = DDPMScheduler.from_pretrained(str(local / "scheduler")) if (local / "scheduler").is_dir() \
            else DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    else:
        pipe = DDPMPipeline.from_pretrained(str(local) if local.is_dir() else str(path), dtype=dtype)
        unet, scheduler = pipe.unet, pipe.scheduler
    if unet.config.in_channels != 3 or unet.config.out_channels != 3:
        raise ValueError(f"{path}: not a pixel-space RGB model (its UNet takes {unet.config.in_channels} channels)")
    unet = unet.to(device).eval().requires_grad_(False)
    return unet, scheduler


def pixel_model(context):
    """The context's pixel model (its own, or the built-in tiny-pixel), loaded once per context."""

    def build():
        from pipeline.models.builtin.pixel import NAME, builtin_pixel_path

        path = builtin_pixel_path() if context.pixel_model in (None, NAME) else context.pixel_model
        return load_pixel_model(path, context.device, context.dtype)

    return context.get("pixel", build)


def timesteps(strength: float, steps: int, n_train: int = 1000) -> list[int]:
    """The timesteps PDM-Pure denoises through: from round(n_train * strength) - 1 down to 0, evenly spaced."""
    start = min(n_train - 1, max(0, round(n_train * strength) - 1))
    n = max(1, math.ceil(strength * steps))
    return sorted({int(round(t)) for t in np.linspace(start, 0, n)}, reverse=True)


def purify_pixels(unet, scheduler, x, strength: float, steps: int, seed: int):
    """x (1 x 3 x H x W in [-1, 1], sides a multiple of the UNet's) noised to the first timestep and DDIM-denoised."""
    import torch

    ts = timesteps(strength, steps, scheduler.config.num_train_timesteps)
    abar = scheduler.alphas_cumprod.to(x.device, torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen).to(x.device)
    x_t = abar[ts[0]].sqrt() * x + (1 - abar[ts[0]]).sqrt() * noise
    clip = bool(getattr(scheduler.config, "clip_sample", True))
    with torch.no_grad():
        for i, t in enumerate(ts):
            tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
            out = unet(x_t.to(unet.dtype), tt).sample
            x0 = predicted_original(scheduler, x_t, out, tt)  # float32
            if clip:
                x0 = x0.clamp(-1, 1)
            if i + 1 == len(ts):
                return x0
            eps = (x_t - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
            t_prev = ts[i + 1]
            x_t = abar[t_prev].sqrt() * x0 + (1 - abar[t_prev]).sqrt() * eps
    return x0


class PDMPure(Purification):
    name = "pdmpure"
    needs_model = True

    def check(self):
        if not 0 < self.param <= 1:
            raise ValueError(f"pdmpure:T needs T in (0, 1] (a fraction of the 1000 timesteps), got {self.param:g}")

    def one(self, rgb, seed, context):
        import torch.nn.functional as F

        unet, scheduler = pixel_model(context)
        multiple = 2 ** (len(unet.config.block_out_channels) - 1)
        x = to_tensor(rgb).to(unet.device) * 2 - 1
        h, w = x.shape[2:]
        x = F.pad(x, (0, -w % multiple, 0, -h % multiple), mode="reflect")
        out = purify_pixels(unet, scheduler, x, self.param, context.diffpure_steps, seed)
        return to_uint8((out[:, :, :h, :w] + 1) / 2)


UNIT = PDMPure
