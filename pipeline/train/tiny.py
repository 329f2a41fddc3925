"""Train the built-in ``tiny`` latent diffusion model on scikit-image's bundled photos (CPU, seeded).

This is the script that made the weights shipped in ``pipeline/models/builtin/weights/`` (the recipe is
``WEIGHTS_RECIPE`` in builtin/build.py); run it again with ``python -m pipeline.train.tiny --out DIR``.
Three stages, one seed:

1. the VAE (SD's shape: 1/8 downsampling, 4 latent channels) learns to reconstruct random
   crops of the training photos: loss = |x - D(z)|_1 + |x - D(z)|_2^2 + beta * KL(q(z|x) || N(0, I)),
   z ~ q(z|x), beta small (as SD's KL-f8 VAE, without its GAN and LPIPS terms);
2. the latent scale is calibrated (1 / std of the latents, as SD's 0.18215 is);
3. the UNet learns to denoise those latents, conditioned on the (random, seeded, frozen) text
   encoder's embedding of the photo's caption: DDPM's loss
   || target - f_theta(z_t, t, c) ||^2, z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, where the
   target is eps ("epsilon"), or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z ("v_prediction").
   An inpainting UNet (9 input channels) also sees [mask, E(x * (1 - mask))], as SD-inpainting.

The photos and their split are `pipeline/data/photos.py`'s: held-out photos (HELD_OUT) are never cropped
for training; every figure in the results is measured on them (`evaluate_vae`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.data.photos import (
    HELD_OUT,
    SEED,
    TRAIN_PHOTOS,
    PhotoCrops,
    held_out_images,
)
from pipeline.models.builtin import build as bm
from pipeline.models.diffusion import denoising_loss, encode_text
from pipeline.models.fitting import fit
from pipeline.seeds import seeded_global_rng
from pipeline.train.curve import CurveLog

CAPTIONS = {name: f"a photo of {name}" for name in TRAIN_PHOTOS + HELD_OUT}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


@torch.no_grad()
def evaluate_vae(vae, images: torch.Tensor) -> dict:
    """Reconstruction of `images` (in [0, 1]) through the posterior mean: PSNR and SSIM."""
    from torchmetrics.functional.image import (
        structural_similarity_index_measure as ssim,
    )

    was_training = vae.training
    vae.eval()
    recon = (vae.decode(vae.encode(images * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2
    vae.train(was_training)  # a frozen model (e.g. a shared test fixture) stays in eval mode
    return {"psnr": float(psnr(recon, images).mean()), "ssim": float(ssim(recon, images, data_range=1.0))}


@dataclass
class VAETraining:  # the shipped weights used: steps 6000, decay, ema 0.999 (builtin/build.py WEIGHTS_RECIPE)
    steps: int = 450
    batch: int = 16
    crop: int = 32  # the VAE is convolutional: small crops train it as well as 64 px ones, faster
    lr: float = 2e-3
    kl_weight: float = 1e-6
    warmup: int = 50
    eval_every: int = 50
    decay: bool = False  # cosine decay of the learning rate to lr_min over `steps` (else constant)
    lr_min: float = 2e-5
    ema: float = 0.0  # > 0: keep an exponential moving average of the weights (e.g. 0.999) and ship it
    colour: bool = False  # recolour the crops (PhotoCrops): smooth colour areas are what a VAE of few colour photos misses


def train_vae(vae, cfg: VAETraining, log=None, checkpoint=None, seed: int = SEED, stage: str = "vae",
              data=None, evaluations: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Train `vae` in place on TRAIN_PHOTOS crops (or `data`: anything with PhotoCrops' `sample(n, size)`);
    returns the curve: PSNR/SSIM at 64 px on the held-out photos, and on each of `evaluations` (name: images).
    The posterior's samples draw from torch's global generator, seeded with `seed` for the call."""
    data = data or PhotoCrops(TRAIN_PHOTOS, seed, colour=cfg.colour)
    held_out = held_out_images(64)

    def loss_at(step):
        x = data.sample(cfg.batch, cfg.crop)[0] * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # |x - D(z)|_1 + |x - D(z)|_2^2 + beta KL, on [-1, 1] images
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()

    def evaluate(shipped):
        point = evaluate_vae(shipped, held_out)
        for name, images in (evaluations or {}).items():
            point.update({f"{name}_{k}": v for k, v in evaluate_vae(shipped, images).items()})
        return point

    vae.train()
    with seeded_global_rng(seed):
        curve = fit(vae.parameters(), loss_at, model=vae, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                    max_grad_norm=1.0, every=cfg.eval_every, stage=stage, decay=cfg.decay, lr_min=cfg.lr_min,
                    ema=cfg.ema, evaluate=evaluate, log=log, checkpoint=checkpoint).curve
    vae.eval()
    return curve


@torch.no_grad()
def calibrate_latent_scale(vae, n: int = 256, seed: int = SEED) -> float:
    """1 / std of the VAE's latents on training crops at 64 px, written to the VAE's config."""
    images = PhotoCrops(TRAIN_PHOTOS, seed + 2).sample(n, 64)[0]
    latents = torch.cat([vae.encode(b * 2 - 1).latent_dist.mean for b in images.split(64)])
    scale = round(1.0 / float(latents.std()), 4)
    vae.register_to_config(scaling_factor=scale)
    return scale


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts) -> torch.Tensor:
    return encode_text([(tokenizer, text_encoder)], prompts)[0]


@dataclass
class LatentPool:
    """Scaled latents of training crops, with each crop's caption index (and inpainting inputs)."""

    latents: torch.Tensor  # N x 4 x h x w, already times the scaling factor
    caption: torch.Tensor  # N, index into prompts
    prompts: tuple[str, ...]
    masks: torch.Tensor | None = None  # N x 1 x h x w, 1 = repaint
    masked_latents: torch.Tensor | None = None  # N x 4 x h x w: E(x * (1 - mask)) * scale


@torch.no_grad()
def latent_pool(vae, n: int = 512, size: int = 64, inpaint: bool = False, seed: int = SEED) -> LatentPool:
    """Encode n training crops once (the VAE is frozen while the UNet trains)."""
    data = PhotoCrops(TRAIN_PHOTOS, seed + 3)
    gen = torch.Generator().manual_seed(seed + 4)
    scale = vae.config.scaling_factor
    lat, caps, masks, masked = [], [], [], []
    for start in range(0, n, 64):
        x, which = data.sample(min(64, n - start), size)
        lat.append(vae.encode(x * 2 - 1).latent_dist.mean * scale)
        caps.extend(which)
        if inpaint:
            m = random_box_masks(len(x), size, gen)
            masks.append(F.max_pool2d(m, 8))  # latent-resolution mask, as the inpainting pipeline makes
            masked.append(vae.encode((x * 2 - 1) * (1 - m)).latent_dist.mean * scale)
    return LatentPool(
        latents=torch.cat(lat), caption=torch.tensor(caps),
        prompts=tuple(CAPTIONS[n_] for n_ in TRAIN_PHOTOS),
        masks=torch.cat(masks) if inpaint else None, masked_latents=torch.cat(masked) if inpaint else None,
    )


def random_box_masks(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """n x 1 x size x size masks, each one box (sides multiple of 8 px), 1 inside; some all-ones."""
    masks = torch.zeros(n, 1, size, size)
    cells = size // 8
    for m in masks:
        if int(torch.randint(0, 10, (1,), generator=gen)) == 0:
            m[:] = 1  # a full mask: the UNet also learns plain generation
            continue
        h, w = (int(torch.randint(1, cells + 1, (1,), generator=gen)) for _ in range(2))
        top, left = (int(torch.randint(0, cells - s + 1, (1,), generator=gen)) for s in (h, w))
        m[:, 8 * top : 8 * (top + h), 8 * left : 8 * (left + w)] = 1
    return masks


@dataclass
class UNetTraining:  # the shipped weights used: 800 steps (UNet), 500 (inpainting) (builtin/build.py WEIGHTS_RECIPE)
    steps: int = 300
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 50
    uncond_prob: float = 0.1  # captions dropped to "" (classifier-free guidance needs an unconditional model)
    plain_prompt_prob: float = 0.3  # "a photo", the default prompt of the mimics
    log_every: int = 100
    decay: bool = False  # cosine decay of the learning rate to lr_min over `steps` (else constant)
    lr_min: float = 1e-5


def captioned_batch(latents, caption, cfg, gen: torch.Generator, plain: int, empty: int):
    """(idx, flip, z, cap): `cfg.batch` latents drawn with replacement, half flipped left-right, their caption
    indices with a share `cfg.plain_prompt_prob` replaced by `plain` ("a photo") and `cfg.uncond_prob` by
    `empty` ("", for classifier-free guidance). The draws come from `gen` in this order (the shipped weights'
    recipe depends on it)."""
    idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
    flip = torch.rand(cfg.batch, generator=gen) < 0.5
    z = torch.where(flip[:, None, None, None], latents[idx].flip(-1), latents[idx])
    cap = caption[idx].clone()
    u = torch.rand(cfg.batch, generator=gen)
    cap[u < cfg.plain_prompt_prob + cfg.uncond_prob] = plain
    cap[u < cfg.uncond_prob] = empty
    return idx, flip, z, cap


def train_unet(unet, scheduler, pool: LatentPool, tokenizer, text_encoder, cfg: UNetTraining,
               log=None, seed: int = SEED) -> list[dict]:
    """Train `unet` in place to denoise `pool`'s latents conditioned on caption embeddings.

    The target follows ``scheduler.config.prediction_type`` ("epsilon" or "v_prediction").
    """
    gen = torch.Generator().manual_seed(seed + 5)
    prompts = list(pool.prompts) + ["a photo", ""]
    embeddings = encode_prompts(tokenizer, text_encoder, prompts)
    plain, empty = len(prompts) - 2, len(prompts) - 1
    inpaint = unet.config.in_channels == 9

    def loss_at(step):
        idx, flip, z, cap = captioned_batch(pool.latents, pool.caption, cfg, gen, plain, empty)
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,), generator=gen)
        extra = None
        if inpaint:
            m, zm = pool.masks[idx], pool.masked_latents[idx]
            m = torch.where(flip[:, None, None, None], m.flip(-1), m)
            zm = torch.where(flip[:, None, None, None], zm.flip(-1), zm)
            extra = torch.cat([m, zm], dim=1)
        return denoising_loss(unet, scheduler, z, noise, t, embeddings[cap], extra_input=extra)

    unet.train()
    with seeded_global_rng(seed):
        curve = fit(unet.parameters(), loss_at, model=unet, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                    max_grad_norm=1.0, every=cfg.log_every, stage="unet-inpaint" if inpaint else "unet",
                    decay=cfg.decay, lr_min=cfg.lr_min, log=log).curve
    unet.eval()
    return curve


# --------------------------------------------------------------------------- the shipped weights


def train_builtin(out: Path, vae_cfg: VAETraining, unet_cfg: UNetTraining, inpaint_cfg: UNetTraining,
                  pool_size: int = 512, vae_init: Path | None = None, vae_seed: int = SEED,
                  vae_only: bool = False, calibration_crops: int = 256) -> Path:
    """Train tiny's VAE, UNet and inpainting UNet; write WEIGHTS_NAME and the curve into `out`.

    `vae_init` starts the VAE from saved weights (a second, lower-learning-rate phase: see
    WEIGHTS_RECIPE in builtin/build.py); `vae_only` stops after the VAE (vae-checkpoint.safetensors).
    """
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    log = CurveLog(out, fresh=vae_init is None)  # a second VAE phase appends to the first's curve
    parts = bm.random_parts("tiny")
    vae = parts["vae"]
    if vae_init:  # a VAE checkpoint, or a packed weights file (its ``vae.*`` tensors)
        init = load_file(vae_init)
        if any(k.startswith("vae.") for k in init):
            init = {k[len("vae."):]: v for k, v in init.items() if k.startswith("vae.")}
        vae.load_state_dict({k: v.float() for k, v in init.items()})
    ckpt = out / "vae-checkpoint.safetensors"
    if vae_cfg.steps:
        train_vae(vae, vae_cfg, log=log, checkpoint=lambda step, model: save_file(model.state_dict(), ckpt), seed=vae_seed,
                  stage="vae" if vae_init is None else "vae-finetune")
    if vae_only:
        save_file(vae.state_dict(), ckpt)
        return ckpt
    vae.requires_grad_(False)
    scale = calibrate_latent_scale(vae, calibration_crops)
    log({"stage": "scale", "scaling_factor": scale})

    tokenizer, text_encoder = parts["tokenizer"], parts["text_encoder"]
    text_encoder.requires_grad_(False)
    unets = {}
    for name, cfg in (("tiny", unet_cfg), ("tiny-inpaint", inpaint_cfg)):
        unet = bm.random_parts(name)["unet"]
        pool = latent_pool(vae, pool_size, inpaint=unet.config.in_channels == 9)
        train_unet(unet, bm.scheduler(), pool, tokenizer, text_encoder, cfg, log=log)
        unets[name] = unet
    log({"stage": "held-out", **evaluate_vae(vae, held_out_images(64))})
    tensors = bm.pack_weights(vae, text_encoder, unets)
    path = out / bm.WEIGHTS_NAME
    save_file(tensors, path, metadata={"scaling_factor": str(scale), "seed": str(SEED),
                                       "train_photos": ",".join(TRAIN_PHOTOS), "held_out": ",".join(HELD_OUT)})
    log({"stage": "done", "weights": str(path), "sha256": bm.sha256(path)})
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vae-steps", type=int, default=VAETraining.steps)
    p.add_argument("--vae-batch", type=int, default=VAETraining.batch)
    p.add_argument("--vae-lr", type=float, default=VAETraining.lr)
    p.add_argument("--vae-crop", type=int, default=VAETraining.crop, help="training crop side in px")
    p.add_argument("--vae-decay", action="store_true", help="cosine-decay the VAE's learning rate over its steps")
    p.add_argument("--vae-ema", type=float, default=0.0, help="ship an EMA of the VAE's weights (e.g. 0.999)")
    p.add_argument("--vae-colour", action="store_true", help="recolour the VAE's training crops (see PhotoCrops)")
    p.add_argument("--vae-eval-every", type=int, default=VAETraining.eval_every)
    p.add_argument("--vae-seed", type=int, default=SEED, help="seed of the VAE's crops (another one for a second phase)")
    p.add_argument("--vae-init", type=Path, help="start the VAE from these weights (a second phase)")
    p.add_argument("--vae-only", action="store_true", help="stop after the VAE (writes vae-checkpoint.safetensors)")
    p.add_argument("--unet-steps", type=int, default=UNetTraining.steps)
    p.add_argument("--inpaint-steps", type=int, default=200)
    p.add_argument("--unet-batch", type=int, default=UNetTraining.batch)
    p.add_argument("--unet-decay", action="store_true", help="cosine-decay the UNets' learning rate over their steps")
    p.add_argument("--pool", type=int, default=512, help="training crops encoded for the UNets")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; 1 on a shared CPU)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    train_builtin(a.out, VAETraining(steps=a.vae_steps, batch=a.vae_batch, lr=a.vae_lr, crop=a.vae_crop,
                                          decay=a.vae_decay, ema=a.vae_ema, eval_every=a.vae_eval_every,
                                          colour=a.vae_colour),
                  UNetTraining(steps=a.unet_steps, batch=a.unet_batch, decay=a.unet_decay),
                  UNetTraining(steps=a.inpaint_steps, batch=a.unet_batch, decay=a.unet_decay),
                  pool_size=a.pool, vae_init=a.vae_init, vae_seed=a.vae_seed, vae_only=a.vae_only)


if __name__ == "__main__":
    main()
