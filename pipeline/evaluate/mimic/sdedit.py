"""SDEdit (image-to-image) mimicry: noise an image to strength s, then denoise it back.

Two ways of denoising, as in the Diff-Protect reference evaluation:

- ``one_step``: a single x0 prediction from z_t, with t = round(s * (T - 1)):
      z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps,       z_0 = s_vae * E(x)
      x0_hat = D( z0_hat(z_t, f_theta(z_t, t, c)) / s_vae )
  with z0_hat = (z_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t) for an eps model and
  z0_hat = sqrt(a_t) z_t - sqrt(1 - a_t) v_hat for a v-prediction model (models.predicted_original).
- ``ddim``: diffusers' `StableDiffusionImg2ImgPipeline` with a `DDIMScheduler` and
  ``ddim_steps`` steps over the full schedule (strength s runs round(s * ddim_steps) of them).

Flow models (SD3, FLUX) are edited the same two ways, the rectified-flow way (models.diffusion):
``one_step`` noises to z_s = (1 - s) z_0 + s eps (t = s T) and predicts z0_hat = z_s - s v_hat; the
multi-step edit is their own img2img pipeline (`StableDiffusion3Img2ImgPipeline`, `FluxImg2ImgPipeline`)
with its flow-matching Euler scheduler, labelled ``euler<steps>``. FLUX is given its distilled guidance
(common.pipeline_guidance).

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
    denoiser,
    flow_pipeline_kwargs,
    generators,
    is_flow_pipeline,
    load_pipeline,
    native_resolution,
    pipeline_guidance,
    to_model_tensor,
    to_pil,
    to_uint8,
    vae_dtype,
)
from pipeline.models.diffusion import (
    denoise,
    latent_shift,
    noise_latents,
    predicted_original,
    text_conditioning,
    vae_latents,
)
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

    def settings(self, sampler: str = "ddim") -> list[tuple[str, float, str]]:
        """(mode, strength, setting label) for every edit this config runs (`sampler`: the multi-step edit's
        scheduler, "ddim", or "euler" for flow models)."""
        out = []
        for mode in self.modes:
            tag = "one_step" if mode == "one_step" else f"{sampler}{self.ddim_steps}"
            out += [(mode, s, f"{tag}/s={s:g}") for s in self.strengths]
        return out


class SDEdit:
    """Edits batches of uint8 images; the model is loaded once (one per Ray actor)."""

    scenario = "sdedit"

    def __init__(self, model: "str | ModelSpec", config: SDEditConfig | None = None, device="auto", dtype="auto"):
        from diffusers import DDIMScheduler

        self.config = config or SDEditConfig()
        self.pipe = load_pipeline("img2img", model, device, dtype)
        self.flow = is_flow_pipeline(self.pipe)
        if not self.flow:  # a flow model keeps its own flow-matching (Euler) scheduler
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
        for mode, strength, label in self.config.settings("euler" if self.flow else "ddim"):
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
        net = denoiser(pipe)
        dtype = net.dtype
        encode_dtype = vae_dtype(pipe, dtype)
        pipe.vae.to(encode_dtype)
        x = to_model_tensor(images, self.resolution).to(self.device, encode_dtype)
        z0 = vae_latents(pipe.vae, x).to(dtype)
        n_train = pipe.scheduler.config.num_train_timesteps
        t = strength * n_train if self.flow else int(round(strength * (n_train - 1)))  # flow: s = t / T = strength
        gens = generators(cfg.seed, keys, self.device)
        eps = torch.stack([torch.randn(z0.shape[1:], generator=g, device=g.device, dtype=dtype) for g in gens])
        timesteps = torch.full((len(images),), t, device=self.device, dtype=torch.float32 if self.flow else torch.long)
        z_t = noise_latents(pipe.scheduler, z0, eps.to(self.device), timesteps)
        size = self.resolution
        cond, added = text_conditioning(pipe, prompts, size, size)
        out = denoise(net, z_t, timesteps, cond, added)
        if cfg.guidance_scale > 1:
            uncond, added_u = text_conditioning(pipe, [""] * len(images), size, size)
            out_u = denoise(net, z_t, timesteps, uncond, added_u)
            out = out_u + cfg.guidance_scale * (out - out_u)  # linear in the output: eps, v or flow velocity alike
        z0_hat = predicted_original(pipe.scheduler, z_t, out, timesteps)
        latents = z0_hat / pipe.vae.config.scaling_factor + latent_shift(pipe.vae)
        x0_hat = pipe.vae.decode(latents.to(encode_dtype)).sample
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
            guidance_scale=pipeline_guidance(self.pipe, cfg.guidance_scale),
            generator=generators(cfg.seed, keys, self.device),
            output_type="np",
            **flow_pipeline_kwargs(self.pipe),
            # flow img2img pipelines default to their own size (FLUX: 1024), not the input's
            **({"height": self.resolution, "width": self.resolution} if self.flow else {}),
        ).images
        return to_uint8(out)
