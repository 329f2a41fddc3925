"""The denoising objective shared by the training mimics (textual inversion, LoRA, DreamBooth), and generation.

Both personalise a frozen model on a group's images with the standard latent-diffusion loss

    L = E_{z, c, t, eps} || f_theta(z_t, t, c) - y_t ||^2,   z_t = sqrt(a_t) z + sqrt(1 - a_t) eps

with y_t the scheduler's prediction target (models.prediction_target: eps, or
v = sqrt(a_t) eps - sqrt(1 - a_t) z for v-prediction models). For SDXL, c is both text encoders'
penultimate hidden states, plus the pooled embedding and the size time ids. For flow models (SD3, FLUX)
the same loss is the rectified-flow one, z_t = (1 - s) z + s eps, y_t = eps - z, t drawn as diffusers'
train_dreambooth_lora_{sd3,flux}.py draw it, c their prompt embeddings and pooled projections, FLUX's
latents packed and its guidance embedding given (models.diffusion.denoise): the FLUX DreamBooth-LoRA recipe.

and differ only in what is trainable (one token embedding, LoRA matrices in the UNet's
attention projections, or the whole UNet) and in the conditioning c (a prompt holding the learned token);
DreamBooth adds its prior-preservation term (`prior`).
Latents z = s * E(x) are encoded once per group (the VAE is frozen).
`TrainingMimic` is what the three mimic classes share: the pipeline they train and sample with, generation,
and `run` (train, save, generate).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

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
    to_uint8,
    vae_dtype,
)
from pipeline.models.diffusion import (
    TIMESTEP_SAMPLING,
    denoiser_family,
    denoising_loss,
    sample_timesteps,
    text_conditioning,
    vae_latents,
)
from pipeline.models.fitting import fit
from pipeline.seeds import key_seed


@dataclass
class MimicTrainingConfig:
    """What every trained mimic (textual inversion, LoRA) shares: its training budget and generation."""

    steps: int = 50
    batch_size: int = 4
    prompt_template: str = "a painting in the style of {token}"
    num_images: int = 4  # generated per group
    inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    resolution: int | None = None


def load_training_pipeline(model, device, dtype):
    """(pipe, train_scheduler): the text2img pipeline a fine-tuning mimic (LoRA, DreamBooth) trains and samples
    with, every part frozen (the mimic unfreezes what it trains), and the scheduler it trains with: DDPM's,
    sampling with DDIM, or a flow model's own flow-matching scheduler for both."""
    from diffusers import DDIMScheduler, DDPMScheduler

    pipe = load_pipeline("text2img", model, device, dtype)
    if is_flow_pipeline(pipe):
        train_scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    else:
        train_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for part in (denoiser(pipe), pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None),
                 getattr(pipe, "text_encoder_3", None)):
        if part is not None:
            part.requires_grad_(False)
    return pipe, train_scheduler


def training_parts(pipe, net, scheduler, **replaced) -> SimpleNamespace:
    """What `train_denoiser` reads: the denoiser being trained (`net`), the training scheduler, and the pipeline's
    tokenizers and text encoders, any of them `replaced` (LoRA's adapted copies, textual inversion's pair)."""
    names = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    return SimpleNamespace(unet=net, scheduler=scheduler,
                           **{n: replaced[n] if n in replaced else getattr(pipe, n, None) for n in names})


@torch.no_grad()
def encode_latents(pipe, images: list[np.ndarray], resolution: int) -> torch.Tensor:
    """z = s * (E(x) - shift) for each image (the encoder's mean: models.diffusion.vae_latents), on the pipeline's device."""
    vae = pipe.vae.to(vae_dtype(pipe, pipe.vae.dtype))  # SDXL's, SD3's and FLUX's VAEs overflow in fp16
    x = to_model_tensor(images, resolution).to(pipe.device, vae.dtype)
    return vae_latents(vae, x).float()


def train_denoiser(
    parts,
    latents: torch.Tensor,
    prompts: Callable[[random.Random, int], list[str]],
    params: Iterable[torch.nn.Parameter],
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    text_grad: bool = False,
    after_step: Callable[[], None] | None = None,
    resolution: int = 512,
    prior: tuple[torch.Tensor, str, float] | None = None,
) -> list[float]:
    """Minimise the denoising loss over `params` for `steps` steps; returns the loss of each step.

    `parts` holds ``unet`` (or a flow model's ``transformer``), ``text_encoder``, ``tokenizer`` and a training
    ``scheduler`` (DDPM, or the flow model's own), and the further text encoders and tokenizers (SDXL, SD3, FLUX); `resolution` is the images' size (SDXL time ids).
    Trainable weights stay fp32; on CUDA the forward pass runs under bf16 autocast.
    `prompts(rng, n)` gives the n prompts of a batch; `text_grad` keeps the text encoder in the
    graph (textual inversion trains an input embedding of it). `after_step` runs after each
    optimiser step (textual inversion restores the embedding rows it must not change).
    `prior` = (class latents, class prompt, lambda): DreamBooth's prior preservation, each step adds
    lambda times the same loss on a batch of the class images under the class prompt (dreambooth.py).
    The optimiser steps are `models.fitting.fit`'s.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rng = random.Random(seed)
    sched = parts.scheduler
    net = parts.transformer if getattr(parts, "transformer", None) is not None else parts.unet
    weighting = TIMESTEP_SAMPLING[denoiser_family(net)]
    device = net.device
    autocast = device.type == "cuda"

    def loss_at(step):
        idx = torch.randint(len(latents), (min(batch_size, len(latents)),), generator=gen)
        z = latents[idx]
        noise = torch.randn(z.shape, generator=gen).to(z.device)
        t = sample_timesteps(sched, len(z), gen, weighting).to(z.device)
        batch_prompts = prompts(rng, len(z))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.set_grad_enabled(text_grad):
                cond, added = text_conditioning(parts, batch_prompts, resolution, resolution)
            loss = denoising_loss(net, sched, z, noise, t, cond, added)  # models/diffusion.py
            if prior is not None:  # + lambda * L(class images, class prompt)
                class_latents, class_prompt, weight = prior
                z_pr = class_latents[torch.randint(len(class_latents), (len(z),), generator=gen)]
                noise_pr = torch.randn(z_pr.shape, generator=gen).to(z_pr.device)
                t_pr = sample_timesteps(sched, len(z_pr), gen, weighting).to(z_pr.device)
                with torch.no_grad():
                    cond_pr, added_pr = text_conditioning(parts, [class_prompt] * len(z_pr), resolution, resolution)
                loss = loss + weight * denoising_loss(net, sched, z_pr, noise_pr, t_pr, cond_pr, added_pr)
        return loss

    # plain AdamW: no weight decay, no clipping, a constant learning rate
    return fit(params, loss_at, steps=steps, lr=learning_rate, after_step=after_step).losses


@torch.no_grad()
def generate(pipe, prompt: str, n: int, seed: int, tag: str, steps: int, guidance_scale: float,
             resolution: int, batch_size: int = 8) -> list[np.ndarray]:
    """n images for `prompt`; image i is seeded by (seed, tag/i), identical across pipelines."""
    images: list[np.ndarray] = []
    keys = [f"{tag}/{i}" for i in range(n)]  # image i's seed: common.mimic_seed(seed, key)
    for b in range(0, n, batch_size):
        chunk = keys[b : b + batch_size]
        out = pipe(
            prompt=[prompt] * len(chunk),
            num_inference_steps=steps,
            guidance_scale=pipeline_guidance(pipe, guidance_scale),
            height=resolution,
            width=resolution,
            generator=generators(seed, chunk, pipe.device),
            output_type="np",
            **flow_pipeline_kwargs(pipe),
        ).images
        images += to_uint8(out)
    return images


def group_seed(seed: int, group: str) -> int:
    """The training seed of a group: protected and clean training of one group use the same."""
    return key_seed(seed, group, "train")


class TrainingMimic:
    """The base of the training mimics (textual inversion, LoRA, DreamBooth): the model loaded once per mimic
    (`load_training_pipeline`: every part frozen, the training scheduler beside the sampler), the resolution
    the group's images are trained and generated at, and `run`.

    A mimic names its `scenario` and `config_class` and implements `train(images, group, save_dir)` (returns
    the file it saved) or `trained_file` (textual inversion), `generate(file, group)` and `setting`.
    """

    scenario = ""
    config_class = MimicTrainingConfig

    def __init__(self, model, config: MimicTrainingConfig | None = None, device="auto", dtype="fp32"):
        self.config = config or self.config_class()
        self.pipe, self.train_scheduler = load_training_pipeline(model, device, dtype)
        self.resolution = self.config.resolution or native_resolution(self.pipe)

    def trained_file(self, images: list[np.ndarray], group: str, workdir: str | Path) -> Path:
        """Train on `images` and save what was learned under `workdir`; the file `generate` reads."""
        return self.train(images, group, workdir)

    def generate_for(self, prompt: str, group: str) -> list[np.ndarray]:
        """The group's `num_images` images for `prompt` with the pipeline as it is now (image i seeded by
        (seed, "<scenario>/<group>/i"))."""
        cfg = self.config
        return generate(self.pipe, prompt, cfg.num_images, cfg.seed, f"{self.scenario}/{group}", cfg.inference_steps,
                        cfg.guidance_scale, self.resolution)

    def run(self, images: list[np.ndarray], group: str, source: str, workdir: str | Path) -> tuple[MimicOutput, Path]:
        """Train on `images`, save under `workdir`, generate; (outputs, the saved file)."""
        start = time.perf_counter()
        path = self.trained_file(images, group, workdir)
        generated = self.generate(path, group)
        keys = [f"{group}/{i}" for i in range(len(generated))]
        out = MimicOutput(self.scenario, self.setting, source, keys, generated, time.perf_counter() - start)
        return out, path
