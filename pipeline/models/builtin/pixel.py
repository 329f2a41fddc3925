"""`tiny-pixel`: a small *pixel-space* DDPM trained on scikit-image's bundled photos, for PDM-Pure.

A diffusers `DDPMPipeline` (a `UNet2DModel` and a `DDPMScheduler`): the UNet predicts the noise eps of

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,        x_0 in [-1, 1] pixels, t in [0, 1000)

(Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020, Algorithm 1: the loss
|| eps - eps_theta(x_t, t) ||^2, linear betas 1e-4 to 0.02 over 1000 steps). It has no attention, so it
is fully convolutional: trained on 32 px crops, it runs on an image of any size (sides padded to a
multiple of 4). What `pdmpure:T` purifies with when no pixel model of the user's is given
(`pipeline/study/purify/pdmpure.py`): it has learned what photo pixels look like at low noise, not
what a latent-diffusion encoder reacts to, which is the point of PDM-Pure.

Training (`python -m pipeline.models.builtin.pixel --out DIR`, the command in WEIGHTS_RECIPE: 0.3 s a
step on an idle core, 12 minutes; the shipped weights took 22 on a shared one): random crops of the training photos of `training.py` (TRAIN_PHOTOS, recoloured
as the second VAE phase was: `PhotoCrops(colour=True)`), AdamW, linear warm-up then cosine decay, an
exponential moving average of the weights shipped. The held-out photos (`training.HELD_OUT`: rocket,
motorcycle) are never cropped for training; `denoising_psnr` measures on them how much a one-step x0
prediction from x_t improves on x_t itself (the curve is printed and written to DIR/curve.jsonl).

The weights ship in ``weights/`` (fp16 safetensors, sha256 checked on load), and the model is saved once
in diffusers format under ``$MIMICSHIELD_CACHE/models/tiny-pixel-v1`` and loaded from there with
`from_pretrained`, like every built-in. Kept out of build.py on purpose (as builtin_upscaler.py is).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.models.builtin.build import (
    WEIGHTS_DIR,
    cached_pipeline_dir,
    models_cache_dir,
    sha256,
)
from pipeline.models.diffusion import prediction_target

NAME = "tiny-pixel"
VERSION = "v1"
SEED = 0
UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32, 64),
            down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, norm_num_groups=8)
MULTIPLE = 4  # image sides must be a multiple of this: two downsamplings
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                 prediction_type="epsilon", clip_sample=True)  # DDPM's own schedule; x0 clipped to [-1, 1]

WEIGHTS_NAME = "tiny-pixel-v1.safetensors"
WEIGHTS_RECIPE = ("python -m pipeline.models.builtin.pixel --out A --steps 2500 --batch 12 --threads 1",)
WEIGHTS_SHA256 = "c333ed32dcc2f6f3bc9325fe2ec7f45b6680c4af39cc458750f53db8eb1d4e9f"
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


def build_unet():
    """The UNet of `tiny-pixel`, freshly initialised with the fixed seed (not trained)."""
    from diffusers import UNet2DModel

    torch.manual_seed(SEED)
    return UNet2DModel(**UNET)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER)


@torch.no_grad()
def denoising_psnr(unet, scheduler, images: torch.Tensor, timesteps=EVAL_TIMESTEPS, seed: int = SEED) -> dict:
    """For each t: PSNR (dB, to the clean images in [0, 1]) of x_t and of the one-step x0 prediction from it."""
    from pipeline.models.builtin.training import psnr
    from pipeline.models.diffusion import predicted_original

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
    from pipeline.models.builtin.training import (
        TRAIN_PHOTOS,
        PhotoCrops,
        held_out_images,
    )
    from pipeline.models.fitting import fit

    torch.manual_seed(seed)
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
    curve = fit(unet.parameters(), loss_at, model=unet, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, decay=True,
                max_grad_norm=1.0, every=cfg.eval_every, stage="pixel", lr_min=cfg.lr_min, ema=cfg.ema,
                evaluate=lambda shipped: denoising_psnr(shipped, scheduler, held_out), log=log).curve
    unet.eval()
    return curve


def load_trained_unet(path: Path | None = None):
    """The trained UNet from the shipped weights (sha256 checked), in fp32."""
    from safetensors.torch import load_file

    path = path or WEIGHTS_DIR / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall mimicshield, or rebuild it with "
                                f"`{WEIGHTS_RECIPE[0].replace(' A ', ' DIR ')}`")
    if path == WEIGHTS_DIR / WEIGHTS_NAME and sha256(path) != WEIGHTS_SHA256:
        raise ValueError(f"{path} does not match its recorded sha256 {WEIGHTS_SHA256} (corrupt or replaced)")
    unet = build_unet()
    unet.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return unet.eval()


def _build():
    from diffusers import DDPMPipeline

    return DDPMPipeline(unet=load_trained_unet(), scheduler=build_scheduler())


def builtin_pixel_path() -> Path:
    """Directory of the built-in pixel DDPM (diffusers `DDPMPipeline` format), generated on first use."""
    return cached_pipeline_dir(models_cache_dir() / f"{NAME}-{VERSION}", _build, NAME)


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
    curve_path = a.out / "curve.jsonl"
    curve_path.unlink(missing_ok=True)

    def log(point):
        print(json.dumps(point), flush=True)
        with curve_path.open("a") as f:
            f.write(json.dumps(point) + "\n")

    unet = build_unet()
    train_pixel(unet, PixelTraining(steps=a.steps, batch=a.batch, crop=a.crop, lr=a.lr, ema=a.ema,
                                    eval_every=a.eval_every), log=log)
    path = a.out / WEIGHTS_NAME
    save_file({k: v.half().contiguous() for k, v in unet.state_dict().items()}, str(path),
              metadata={"seed": str(SEED), "args": " ".join(sys.argv[1:] if argv is None else argv)})
    log({"stage": "done", "weights": str(path), "sha256": sha256(path), "bytes": path.stat().st_size})


if __name__ == "__main__":
    main()
