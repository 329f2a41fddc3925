"""Train `tiny-pixel`, the pixel-space DDPM of PDM-Pure (models/builtin/pixel.py: its config and weights).

This is the script that made ``pipeline/models/builtin/weights/tiny-pixel-v1.safetensors``; run it again with
``python -m pipeline.train.pixel --out DIR`` (the command in pixel.WEIGHTS_RECIPE: 0.3 s a step on an idle
core, 12 minutes; the shipped weights took 22 on a shared one). The UNet learns DDPM's loss

    || eps - eps_theta(x_t, t) ||^2,   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   x_0 in [-1, 1] pixels

(Ho et al. 2020, Algorithm 1) on random 32 px crops of the training photos (data/photos.py TRAIN_PHOTOS,
recoloured as tiny's second VAE phase was: `PhotoCrops(colour=True)`), AdamW, linear warm-up then cosine
decay, an exponential moving average of the weights shipped. The held-out photos (`HELD_OUT`: rocket,
motorcycle) are never cropped for training; `denoising_psnr` measures on them how much a one-step x0
prediction from x_t improves on x_t itself (the curve is printed and written to DIR/curve.jsonl).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.data.photos import TRAIN_PHOTOS, PhotoCrops, held_out_images
from pipeline.models.builtin.build import sha256
from pipeline.models.builtin.pixel import (
    SEED,
    WEIGHTS_NAME,
    build_scheduler,
    build_unet,
)
from pipeline.models.diffusion import predicted_original, prediction_target
from pipeline.models.fitting import fit
from pipeline.seeds import seeded_global_rng
from pipeline.train.curve import CurveLog
from pipeline.train.tiny import psnr

EVAL_TIMESTEPS = (50, 100, 200)  # where `denoising_psnr` measures (pdmpure's default T = 0.1 is t = 100)


@dataclass
class PixelTraining:
    steps: int = 2500
    batch: int = 12
    crop: int = 32
    lr: float = 2e-3
    lr_min: float = 2e-5
    warmup: int = 100
    ema: float = 0.999
    eval_every: int = 500


@torch.no_grad()
def denoising_psnr(unet, scheduler, images: torch.Tensor, timesteps=EVAL_TIMESTEPS, seed: int = SEED) -> dict:
    """For each t: PSNR (dB, to the clean images in [0, 1]) of x_t and of the one-step x0 prediction from it."""
    gen = torch.Generator().manual_seed(seed)
    x0 = images * 2 - 1
    out = {}
    was_training = unet.training
    unet.eval()
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=gen)
        tt = torch.full((len(x0),), t, dtype=torch.long)
        xt = scheduler.add_noise(x0, noise, tt)
        x0_hat = predicted_original(scheduler, xt, unet(xt, tt).sample, tt).clamp(-1, 1)
        out[f"t{t}_noisy"] = round(float(psnr((xt.clamp(-1, 1) + 1) / 2, images).mean()), 2)
        out[f"t{t}_denoised"] = round(float(psnr((x0_hat + 1) / 2, images).mean()), 2)
    unet.train(was_training)
    return out


def train_pixel(unet, cfg: PixelTraining, log=None, seed: int = SEED) -> list[dict]:
    """Train `unet` in place on recoloured crops of the training photos (DDPM's loss); returns the curve."""
    data = PhotoCrops(TRAIN_PHOTOS, seed, colour=True)
    held_out = held_out_images(64)
    scheduler = build_scheduler()
    gen = torch.Generator().manual_seed(seed + 7)

    def loss_at(step):
        x0 = data.sample(cfg.batch, cfg.crop)[0] * 2 - 1
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,), generator=gen)
        pred = unet(scheduler.add_noise(x0, noise, t), t).sample  # Algorithm 1: || eps - eps_theta(x_t, t) ||^2
        return F.mse_loss(pred, prediction_target(scheduler, x0, noise, t))

    unet.train()
    with seeded_global_rng(seed):
        curve = fit(unet.parameters(), loss_at, model=unet, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                    decay=True, max_grad_norm=1.0, every=cfg.eval_every, stage="pixel", lr_min=cfg.lr_min,
                    ema=cfg.ema, evaluate=lambda shipped: denoising_psnr(shipped, scheduler, held_out), log=log).curve
    unet.eval()
    return curve


def main(argv=None) -> None:
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=PixelTraining.steps)
    p.add_argument("--batch", type=int, default=PixelTraining.batch)
    p.add_argument("--crop", type=int, default=PixelTraining.crop)
    p.add_argument("--lr", type=float, default=PixelTraining.lr)
    p.add_argument("--ema", type=float, default=PixelTraining.ema)
    p.add_argument("--eval-every", type=int, default=PixelTraining.eval_every)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; 1 on a shared CPU)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    log = CurveLog(a.out)
    unet = build_unet()
    train_pixel(unet, PixelTraining(steps=a.steps, batch=a.batch, crop=a.crop, lr=a.lr, ema=a.ema,
                                    eval_every=a.eval_every), log=log)
    path = a.out / WEIGHTS_NAME
    save_file({k: v.half().contiguous() for k, v in unet.state_dict().items()}, str(path),
              metadata={"seed": str(SEED), "args": " ".join(sys.argv[1:] if argv is None else argv)})
    log({"stage": "done", "weights": str(path), "sha256": sha256(path), "bytes": path.stat().st_size})


if __name__ == "__main__":
    main()
