"""ASPL: Anti-DreamBooth's alternating surrogate and perturbation learning (Van Le et al., ICCV 2023,
arXiv 2303.15433), protecting one group's images (an artist's or a person's set) together.

The target is a DreamBooth mimic: a model theta fine-tuned on the protected set x' = x + delta. Anti-DreamBooth
poses it as a bi-level problem (paper eq. 5-6):

    delta* = argmax_{||delta_i||_inf <= eps}  sum_i L_cond(theta*(delta), x_i + delta_i)
    theta*(delta) = argmin_theta  sum_i L_cond(theta, x_i + delta_i)
    L_cond(theta, x) = E_{t, eps} || f_theta(z_t, t, c) - y_t ||^2,   z = s E(x), z_t = noise_latents(z, eps, t)

(y_t the model's own target, eps / v / flow velocity: models.diffusion.denoising_loss, methods.semantic_loss;
c the sample's prompt). ASPL (paper Algorithm 1) approximates theta* by alternating, in each round:

    theta' <- theta;  K_f steps of  theta' <- theta' - lr grad_theta' L_cond(theta', x)          (clean images)
    K_adv steps of    x' <- Proj_eps(x' + alpha sign(grad_x' L_cond(theta', x')))                 (against theta')
    K_f steps of      theta <- theta - lr grad_theta L_cond(theta, x')                            (perturbed images)

theta starts at the pre-trained weights; the surrogate theta' learns the clean set ("the model the mimic will
reach"), the perturbation maximises its loss, and theta follows the perturbed set as the mimic would.

Defaults (`engine.ASPLOptions`) are the reference script's: K_f = 3, K_adv = 6, 50 rounds (``--steps 300``),
lr 5e-7, alpha 5e-3 and eps 5e-2 in [-1, 1] units (``--step-size 0.64 --eps 6.4`` in pixel units; the project's
default ``--eps 16 --step-size 1`` is the comparison budget of the other methods). Two simplifications, said
here: the surrogate fine-tunes the UNet only (the reference also trains the text encoder) and without the
prior-preservation term (at lr 5e-7 for 3 steps the surrogate stays near the prior anyway); the surrogate's
training batch is drawn from the group (``batch_size``, the reference uses 1 image + 1 class image).

``surrogate="lora"`` (``--low-memory``; Anti-DreamBooth's LoRA variant for 24 GB cards): theta and theta' are
rank-r adapters on the frozen UNet's attention projections (peft, as the LoRA mimic), lr 1e-4 as LoRA
DreamBooth trains, instead of a full trainable copy of the UNet: memory of the adapters, not of a UNet.

A group is what one call to `protect` receives (the pipeline batches one group per actor task:
batch/driver.py). Within it, images are protected together per working size (with ``--resolution N`` all share
one); the PGD steps and encodes run `chunk_size` images at a time, so an artist's set of hundreds of images
needs the memory of a few (the surrogate trains on `batch_size` of them per step anyway). Randomness: the start and each PGD draw come from each key's generator (as every method's), the
surrogate's training draws from the group's (the seed and the sorted keys), so a group's result does not depend
on the order of its images.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch

from pipeline.models.diffusion import denoising_loss, sample_timesteps
from pipeline.models.fitting import fit
from pipeline.models.loading import DiffusionModels
from pipeline.protect.engine import Protector, seen_by_models
from pipeline.protect.methods import StepInputs, encode, semantic_loss
from pipeline.seeds import key_seed, seeded_global_rng

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections (as the LoRA mimic's)
ADAPTER = "aspl_surrogate"


def group_generator(seed: int, keys: list[str]) -> torch.Generator:
    """The group's generator: seeded by the run seed and the sorted keys (stream ``aspl``)."""
    return torch.Generator().manual_seed(key_seed(seed, "\n".join(sorted(keys)), "aspl"))


def take(added: dict | None, idx: torch.Tensor) -> dict | None:
    """The added conditioning (SDXL time ids, pooled embeddings) of the rows `idx`."""
    if added is None:
        return None
    return {k: v[idx] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in added.items()}


class Surrogate:
    """theta: a trainable copy of the UNet ("full") or LoRA adapters on the model's own UNet ("lora").

    `snapshot()` / `restore()` copy the trainable weights (theta' starts from theta each round).
    Use as a context manager: the adapters are removed from the shared UNet on exit.
    """

    def __init__(self, models: DiffusionModels, kind: str, rank: int, seed: int = 0):
        self.models, self.kind = models, kind
        if kind == "full":
            self.net = copy.deepcopy(models.unet).float()
            self.net.requires_grad_(True)
        else:
            import peft

            self.net = models.unet
            with seeded_global_rng(seed):  # peft's init of A draws from the global generator
                self.net.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                                     target_modules=list(LORA_TARGETS)), adapter_name=ADAPTER)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()  # trainable weights in fp32 whatever the model's dtype
        self.net.train()

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, saved):
                p.copy_(v)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.kind == "lora":
            self.net.unload_lora()  # the adapters and peft's wrapper layers: the shared UNet as it was
            self.net.requires_grad_(False)
            self.net.eval()
        else:
            self.net = None
        self.params = []


def autocast(device: torch.device):
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())


def fine_tune(surrogate: Surrogate, latents: torch.Tensor, cond: torch.Tensor, added: dict | None, steps: int,
              learning_rate: float, batch_size: int, gen: torch.Generator) -> list[float]:
    """K_f steps of theta <- theta - lr grad L_cond(theta, x) on the group's latents (`fit`: AdamW, weight decay
    1e-2, a fresh optimiser each call as the reference's train_one_epoch); returns the losses."""
    if steps == 0:
        return []
    models = surrogate.models

    def loss_at(step):  # L_cond(theta, x) on a batch of the group
        idx = torch.randperm(len(latents), generator=gen)[:batch_size]
        z = latents[idx.to(latents.device)]
        noise = torch.randn(z.shape, generator=gen).to(z.device, z.dtype)
        t = sample_timesteps(models.scheduler, len(idx), gen, models.timestep_weighting).to(z.device)
        with autocast(z.device):
            return denoising_loss(surrogate.net, models.scheduler, z, noise, t, cond[idx.to(cond.device)],
                                  take(added, idx.to(z.device)))

    return fit(surrogate.params, loss_at, steps=steps, lr=learning_rate, weight_decay=1e-2).losses


class ASPLProtector(Protector):
    """`Protector` interface; `protect(images, keys)` treats all its images as one group (module doc)."""

    pgd_method = "advdm"  # the PGD step ascends L_cond, advdm's loss, at the surrogate theta'
    chunk_size = 4  # images per PGD step and per encode: a step's memory is that of 4 images whatever the group's size

    def __init__(self, models, config):
        super().__init__(models, config)
        if len(self.members) > 1:
            raise ValueError("aspl protects against one model (its surrogate is a fine-tuned copy of it); "
                             "give one --model")

    def rounds(self, steps: int) -> int:
        return math.ceil(steps / self.config.aspl.pgd_steps)

    def resident_bytes(self) -> int:
        """The surrogate's trainable weights in fp32, their gradients, AdamW's two moments and the round's
        snapshot: 5 x 4 bytes per trainable parameter (a full UNet copy, or the LoRA adapters). The surrogate's
        own training step (a batch of `batch_size` latents) is not counted: the gate refuses only what surely
        cannot fit."""
        opts = self.config.aspl
        if opts.surrogate == "full":
            trainable = sum(p.numel() for p in self.models.unet.parameters())
        else:  # rank r on each target projection: r x (in + out)
            trainable = sum(opts.lora_rank * (m.in_features + m.out_features)
                            for name, m in self.models.unet.named_modules()
                            if isinstance(m, torch.nn.Linear) and name.endswith(LORA_TARGETS))
        return 20 * trainable

    def protect(self, images, keys=None, prompts=None, starts=None):
        """As `Protector.protect`, the images taken as one group, in key order (the result does not depend on
        the order they come in: the pipeline's groups arrive in any order)."""
        keys = keys or [str(i) for i in range(len(images))]
        order = sorted(range(len(images)), key=lambda i: keys[i])
        pick = lambda values: None if values is None else [values[i] for i in order]
        out = super().protect(pick(images), pick(keys), pick(prompts), pick(starts))
        result = [None] * len(images)
        for j, i in enumerate(order):
            result[i] = out[j]
        return result

    def protect_tensor(self, x, keys, prompts, start=None, working=None):
        cfg, opts, models = self.config, self.config.aspl, self.models
        device = models.device
        eps, alpha = cfg.eps / 255.0, cfg.step_size / 255.0
        gens, x_clean, x_adv = self.start_point(x, keys, start)
        group = group_generator(cfg.seed, keys)
        height, width = working or x.shape[2:]
        latent_shape = (models.latent_channels, height // models.vae_factor, width // models.vae_factor)
        cond, added = models.encode_prompts(prompts), models.added_conditioning(prompts, height, width)
        lr = opts.learning_rate if opts.surrogate == "full" else opts.lora_learning_rate
        rows = torch.arange(len(x_clean), device=device)
        chunks = [slice(i, i + self.chunk_size) for i in range(0, len(x_adv), self.chunk_size)]
        clean_latents = self.encode_chunks(x_clean, chunks, working)
        rounds = self.rounds(cfg.steps)
        done = 0
        with Surrogate(models, opts.surrogate, opts.lora_rank, group.initial_seed()) as theta:
            for _ in range(rounds):
                saved = theta.snapshot()  # theta' <- theta, then K_f steps on the clean set
                fine_tune(theta, clean_latents, cond, added, opts.surrogate_steps, lr, opts.batch_size, group)
                for _ in range(min(opts.pgd_steps, cfg.steps - done)):  # K_adv PGD steps against theta'
                    # chunk by chunk: each image's step depends on its own loss only (theta' is fixed here), and
                    # each draws t and eps from its own generator, so chunking changes nothing but the memory
                    x_adv = torch.cat([self.pgd_step(theta.net, x_adv[c], x_clean[c], gens[c], cond[c],
                                                     take(added, rows[c]), alpha, eps, latent_shape, working)
                                       for c in chunks])
                    done += 1
                theta.restore(saved)  # theta: K_f steps on the perturbed set, as the mimic would train
                adv_latents = self.encode_chunks(x_adv, chunks, working)
                fine_tune(theta, adv_latents, cond, added, opts.surrogate_steps, lr, opts.batch_size, group)
        return ((x_adv.detach() - x_clean) * 255.0).float().cpu()

    def encode_chunks(self, x: torch.Tensor, chunks: list[slice], working) -> torch.Tensor:
        """z = s E(R(x)) of the group, `chunk_size` images at a time, in fp32."""
        with torch.no_grad():
            return torch.cat([encode(self.models, seen_by_models(x[c], working)).float() for c in chunks])

    def pgd_step(self, net, x_adv, x_clean, gens, cond, added, alpha, eps, latent_shape, working) -> torch.Tensor:
        """x' <- Proj_eps(x' + alpha sign(grad_x' L_cond(theta', x'))) for a chunk of the group's images."""
        models, device = self.models, self.models.device
        x_adv = x_adv.detach().requires_grad_(True)
        inputs = StepInputs(
            cond=cond,
            t=torch.cat([sample_timesteps(models.scheduler, 1, g, models.timestep_weighting) for g in gens]).to(device),
            noise=torch.stack([torch.randn(latent_shape, generator=g) for g in gens]).to(device, models.dtype),
            added_cond=added,
        )
        with autocast(device):
            loss = semantic_loss(models, encode(models, seen_by_models(x_adv, working)), inputs, net)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        with torch.no_grad():  # ascend L_cond
            x_adv = x_adv + alpha * grad.sign()
            return torch.min(torch.max(x_adv, x_clean - eps), x_clean + eps).clamp(0, 1)


def mimic_loss(models: DiffusionModels, x01: torch.Tensor, prompts: list[str], steps: int, learning_rate: float,
               seed: int = 0, draws: int = 16, batch_size: int = 4) -> float:
    """ASPL's objective as a mimic meets it: L_cond(theta*, x) after `steps` fine-tuning steps of a full copy
    of the UNet on the set `x01` (B x 3 x H x W in [0, 1]), averaged over `draws` fixed (t, eps) per image.
    Higher: the fine-tuned model fits the set worse. For tests and benchmarks (ASPL against noise)."""
    gen = torch.Generator().manual_seed(seed)
    x01 = x01.to(models.device)
    cond = models.encode_prompts(prompts)
    with torch.no_grad():
        latents = encode(models, x01).float()
    with Surrogate(models, "full", 1) as theta:
        fine_tune(theta, latents, cond, None, steps, learning_rate, batch_size, gen)
        theta.net.eval()
        n = len(x01)
        with torch.no_grad():
            total = 0.0
            for _ in range(draws):
                inputs = StepInputs(cond=cond, t=sample_timesteps(models.scheduler, n, gen).to(models.device),
                                    noise=torch.randn(latents.shape, generator=gen).to(models.device, models.dtype))
                total += float(semantic_loss(models, latents.to(models.dtype), inputs, theta.net).mean())
    return total / draws
