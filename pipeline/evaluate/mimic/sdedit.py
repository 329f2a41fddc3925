"""SDEdit (image-to-image) mimicry: noise an image to strength s, then denoise it back.

Two ways of denoising, as in the Diff-Protect reference evaluation:

- ``one_step``: a single x0 prediction from z_t, with t = round(s * (T - 1)):
      z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps,       z_0 = s_vae * E(x)
      x0_hat = D( z0_hat(z_t, f_theta(z_t, t, c)) / s_vae )
  with z0_hat = (z_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t) for an eps model and
  z0_hat = sqrt(a_t) z_t - sqrt(1 - a_t) v_hat for a v-prediction model (models.predicted_original).
- ``ddim``: diffusers' `StableDiffusionImg2ImgPipeline` with a `DDIMScheduler` and
  ``ddim_steps`` steps over the full schedule (strength s runs round(s * ddim_steps) of them).

The noise of each image comes from a seed derived from (seed, key), so a protected image and
its clean original are edited with the very same noise: differences come from the inputs only.

Reference settings: strengths {0.01, 0.05, 0.1, 0.2, 0.3}, 100 DDIM steps, guidance 1.
Defaults here: strengths 0.1, 0.2, 0.3, 0.5; ``ddim_steps`` 100 (use fewer on CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.evaluate.mimic.common import (
    MimicOutput,
    generators,
    load_pipeline,
    native_resolution,
    text_conditioning,
    to_model_tensor,
    to_pil,
    to_uint8,
)
from pipeline.models.diffusion import predicted_original
from pipeline.models.loading import ModelSpec

SDEDIT_MODES = ("one_step", "ddim")


@dataclass
class SDEditConfig:
    strengths: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    modes: tuple[str, ...] = SDEDIT_MODES
    ddim_steps: int = 100
    guidance_scale: float = 1.0  # the reference evaluation edits without classifier-free guidance
    prompt: str = "a photo"  # for samples without a prompt of their own
    seed: int = 0
    resolution: int | None = None  # None: the model's native size
    batch_size: int = 8

    def __post_init__(self):
        bad = [m for m in self.modes if m not in SDEDIT_MODES]
        if bad:
            raise ValueError(f"unknown SDEdit mode(s) {bad}; choose from {', '.join(SDEDIT_MODES)}")
        if any(not 0 < s <= 1 for s in self.strengths):
            raise ValueError(f"SDEdit strengths must be in (0, 1], got {self.strengths}")

    def settings(self) -> list[tuple[str, float, str]]:
        """(mode, strength, setting label) for every edit this config runs."""
        out = []
        for mode in self.modes:
            tag = "one_step" if mode == "one_step" else f"ddim{self.ddim_steps}"
            out += [(mode, s, f"{tag}/s={s:g}") for s in self.strengths]
        return out


class SDEdit:
    """Edits batches of uint8 images; the model is loaded once (one per Ray actor)."""

    scenario = "sdedit"

    def __init__(self, model: "str | ModelSpec", config: SDEditConfig | None = None, device="auto", dtype="auto"):
        from diffusers import DDIMScheduler

        self.config = config or SDEditConfig()
        self.pipe = load_pipeline("img2img", model, device, dtype)
        self.pipe.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.resolution = self.config.resolution or native_resolution(self.pipe)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def run(self, images: list[np.ndarray], keys: list[str], source: str,
            prompts: list[str | None] | None = None) -> list[MimicOutput]:
        """Every configured edit of `images` (one `MimicOutput` per mode and strength)."""
        prompts = [p or self.config.prompt for p in (prompts or [None] * len(images))]
        outputs = []
        for mode, strength, label in self.config.settings():
            start = time.perf_counter()
            edited: list[np.ndarray] = []
            bs = self.config.batch_size
            for i in range(0, len(images), bs):
                chunk = slice(i, i + bs)
                fn = self.one_step if mode == "one_step" else self.ddim
                edited += fn(images[chunk], keys[chunk], prompts[chunk], strength)
            outputs.append(MimicOutput(self.scenario, label, source, list(keys), edited, time.perf_counter() - start))
        return outputs

    @torch.no_grad()
    def one_step(self, images, keys, prompts, strength: float) -> list[np.ndarray]:
        pipe, cfg = self.pipe, self.config
        dtype = pipe.unet.dtype
        scale = pipe.vae.config.scaling_factor
        vae_dtype = torch.float32 if (dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False)
                                      and hasattr(pipe, "text_encoder_2")) else dtype  # SDXL's VAE in fp16
        pipe.vae.to(vae_dtype)
        x = to_model_tensor(images, self.resolution).to(self.device, vae_dtype)
        z0 = (pipe.vae.encode(x).latent_dist.mean * scale).to(dtype)
        n_train = pipe.scheduler.config.num_train_timesteps
        t = int(round(strength * (n_train - 1)))
        gens = generators(cfg.seed, keys, self.device)
        eps = torch.stack([torch.randn(z0.shape[1:], generator=g, device=g.device, dtype=dtype) for g in gens])
        alpha = pipe.scheduler.alphas_cumprod[t].to(self.device, torch.float32)
        z_t = (alpha.sqrt() * z0.float() + (1 - alpha).sqrt() * eps.to(self.device).float()).to(dtype)
        timesteps = torch.full((len(images),), t, device=self.device, dtype=torch.long)
        size = self.resolution
        cond, added = text_conditioning(pipe, prompts, size, size)
        out = pipe.unet(z_t, timesteps, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        if cfg.guidance_scale > 1:
            uncond, added_u = text_conditioning(pipe, [""] * len(images), size, size)
            out_u = pipe.unet(z_t, timesteps, encoder_hidden_states=uncond, added_cond_kwargs=added_u).sample
            out = out_u + cfg.guidance_scale * (out - out_u)  # linear in the output: eps or v alike
        z0_hat = predicted_original(pipe.scheduler, z_t, out, timesteps)
        x0_hat = pipe.vae.decode((z0_hat / scale).to(vae_dtype)).sample
        return to_uint8(x0_hat)

    @torch.no_grad()
    def ddim(self, images, keys, prompts, strength: float) -> list[np.ndarray]:
        cfg = self.config
        steps = max(cfg.ddim_steps, int(np.ceil(1 / strength)))  # at least one denoising step
        out = self.pipe(
            prompt=list(prompts),
            image=to_pil(images, self.resolution),
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=cfg.guidance_scale,
            generator=generators(cfg.seed, keys, self.device),
            output_type="np",
        ).images
        return to_uint8(out)
