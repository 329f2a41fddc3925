"""Train the built-in ``tiny-style`` model on the style world (`pipeline/data/styles.py`): CPU, seeded, one core.

This is the script that made ``pipeline/models/builtin/weights/tiny-style-v1.safetensors`` (the recipe is
``STYLE_WEIGHTS_RECIPE`` in builtin/build.py); run it again with
``python -m pipeline.train.style --out DIR``. Three stages:

1. the VAE starts from ``tiny``'s shipped VAE and is fine-tuned on 64 px crops, half recoloured photos,
   half renders of the 24 training styles (so hatching, dots and outlines survive the 1/8 latent), with
   tiny's loss |x - D(z)|_1 + |x - D(z)|_2^2 + beta KL; the latent scale is calibrated again;
2. the UNet (tiny-style's config) and the text encoder (tiny's seeded random one as the start) learn
   together, from scratch for the UNet, the denoising loss || eps - eps_theta(z_t, t, c(y)) ||^2 over a
   pool of latents: 3/4 style renders captioned from STYLE_TEMPLATES ("a painting in the style of
   <name>", ...), 1/4 photos captioned "a photo of <content>" or "a photo"; 10% of captions dropped
   to "" (classifier-free guidance);
3. held-out figures: VAE PSNR on the held-out photos (data/photos.py HELD_OUT) and on the held-out styles
   painted on held-out photos, and the *prompted style accuracy*: for each training style, images
   generated from "a painting in the style of <name>" attributed by the style score
   (metrics/style.py) among the 24 training styles' renders of other content (chance 1/24).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.photos import (
    SEED,
    TRAIN_PHOTOS,
    PhotoCrops,
    held_out_images,
)
from pipeline.data.styles import (
    HELD_OUT_STYLES,
    JUDGE_PHOTOS,
    TRAIN_STYLES,
    artist_images,
    style_crops,
)
from pipeline.io.images import to_batch
from pipeline.metrics.style import StyleDescriptor, StyleJudge
from pipeline.models.builtin import build as bm
from pipeline.models.diffusion import denoising_loss, encode_text
from pipeline.models.fitting import fit
from pipeline.seeds import seeded_global_rng
from pipeline.train.curve import CurveLog
from pipeline.train.tiny import VAETraining, evaluate_vae, train_vae

STYLE_TEMPLATES = ("a painting in the style of {style}", "an artwork in the style of {style}",
                   "a painting of {content} in the style of {style}", "a picture by {style}")
PHOTO_TEMPLATES = ("a photo of {content}", "a photo")


class StyleWorldCrops:
    """The VAE's training images: half recoloured photo crops, half training-style renders (PhotoCrops' API)."""

    def __init__(self, seed: int = SEED):
        self.photos = PhotoCrops(TRAIN_PHOTOS, seed, colour=True)
        self.content = PhotoCrops(TRAIN_PHOTOS, seed + 1)
        self.gen = torch.Generator().manual_seed(seed + 2)

    def sample(self, n: int, size: int):
        k = n // 2
        painted = style_crops(TRAIN_STYLES, n - k, size, self.content, self.gen)[0]
        return torch.cat([self.photos.sample(k, size)[0], painted]), None


def held_out_renders(size: int = 64, per_style: int = 4) -> torch.Tensor:
    """The held-out styles on held-out photos: the VAE's figure on paintings it never saw."""
    return torch.cat([to_batch(artist_images(s, per_style, size, seed=SEED + 21)) for s in HELD_OUT_STYLES])


@dataclass
class StylePool:
    latents: torch.Tensor  # N x 4 x 8 x 8, scaled
    style: torch.Tensor  # N, index into TRAIN_STYLES, -1 for a photo
    content: torch.Tensor  # N, index into TRAIN_PHOTOS


@torch.no_grad()
def style_pool(vae, n: int, size: int = 64, seed: int = SEED) -> StylePool:
    """n latents, 3/4 training-style renders and 1/4 photos, encoded once (the VAE is frozen by then)."""
    crops = PhotoCrops(TRAIN_PHOTOS, seed + 3)
    gen = torch.Generator().manual_seed(seed + 4)
    lat, sty, con = [], [], []
    for start in range(0, n, 64):
        m = min(64, n - start)
        n_photo = m // 4
        painted, which, photo_idx = style_crops(TRAIN_STYLES, m - n_photo, size, crops, gen)
        photos, photo_only = crops.sample(n_photo, size)
        x = torch.cat([painted, photos])
        lat.append(vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor)
        sty += which + [-1] * n_photo
        con += list(photo_idx) + list(photo_only)
    return StylePool(torch.cat(lat), torch.tensor(sty), torch.tensor(con))


def caption(style: int, content: int, rng: random.Random) -> str:
    names = TRAIN_PHOTOS[content]
    if style < 0:
        return rng.choice(PHOTO_TEMPLATES).format(content=names)
    return rng.choice(STYLE_TEMPLATES).format(style=TRAIN_STYLES[style].name, content=names)


@dataclass
class StyleUNetTraining:
    steps: int = 4000
    batch: int = 32
    lr: float = 1e-3
    text_lr: float = 3e-4
    warmup: int = 100
    uncond_prob: float = 0.1
    lr_min: float = 2e-5
    eval_every: int = 1000


def train_style_unet(unet, text_encoder, tokenizer, scheduler, pool: StylePool, cfg: StyleUNetTraining,
                     vae=None, log=None, seed: int = SEED) -> list[dict]:
    """UNet and text encoder trained together on `pool` (in place); the curve, with prompted style accuracy."""
    gen = torch.Generator().manual_seed(seed + 5)
    rng = random.Random(seed + 6)

    def loss_at(step):
        unet.train()  # (prompted_style_accuracy leaves both in eval mode)
        text_encoder.train()
        idx = torch.randint(0, len(pool.latents), (cfg.batch,), generator=gen)
        z = pool.latents[idx]
        flip = torch.rand(cfg.batch, generator=gen) < 0.5
        z = torch.where(flip[:, None, None, None], z.flip(-1), z)
        prompts = ["" if rng.random() < cfg.uncond_prob else caption(int(pool.style[i]), int(pool.content[i]), rng)
                   for i in idx]
        cond = encode_text([(tokenizer, text_encoder)], prompts)[0]
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,), generator=gen)
        return denoising_loss(unet, scheduler, z, noise, t, cond)

    def evaluate(_):
        return {} if vae is None else {"prompted_style_accuracy": prompted_style_accuracy(vae, unet, text_encoder,
                                                                                          tokenizer)}

    groups = [{"params": unet.parameters(), "lr": cfg.lr}, {"params": text_encoder.parameters(), "lr": cfg.text_lr}]
    with seeded_global_rng(seed):
        curve = fit(groups, loss_at, model=unet, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, decay=True,
                    max_grad_norm=1.0, every=cfg.eval_every, stage="style-unet", lr_min=cfg.lr_min,
                    evaluate=evaluate, log=log).curve
    unet.eval()
    text_encoder.eval()
    return curve


@torch.no_grad()
def prompted_style_accuracy(vae, unet, text_encoder, tokenizer, per_style: int = 4, steps: int = 25) -> float:
    """Images generated from each training style's caption, attributed among the 24 training styles."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(bm.scheduler().config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    was = unet.training, text_encoder.training
    unet.eval()
    text_encoder.eval()
    judge = StyleJudge(StyleDescriptor(), {s.name: artist_images(s, 8, 64, seed=SEED + 31, photos=JUDGE_PHOTOS)
                                           for s in TRAIN_STYLES}, 64)
    hits = []
    for i, style in enumerate(TRAIN_STYLES):
        out = pipe([style.caption] * per_style, num_inference_steps=steps, guidance_scale=7.5, height=64, width=64,
                   generator=torch.Generator().manual_seed(SEED + i), output_type="np").images
        images = [np.round(img * 255).astype(np.uint8) for img in out]
        hits += judge.score(images, style.name)["style_match"]
    unet.train(was[0])
    text_encoder.train(was[1])
    return round(float(np.mean(hits)), 4)


def train_tiny_style(out: Path, vae_cfg: VAETraining, unet_cfg: StyleUNetTraining, pool_size: int) -> Path:
    """All three stages; writes build.STYLE_WEIGHTS_NAME and curve.jsonl into `out`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    log = CurveLog(out)
    tiny = bm.build_pipeline("tiny")
    bm.load_trained_weights(tiny, "tiny")  # start from tiny's VAE and text encoder
    parts = bm.random_parts("tiny-style")
    vae, text_encoder, tokenizer, unet = tiny.vae, tiny.text_encoder, tiny.tokenizer, parts["unet"]
    renders = held_out_renders()
    log({"stage": "vae-start", **evaluate_vae(vae, renders)})
    if vae_cfg.steps:
        train_vae(vae, vae_cfg, log=log, data=StyleWorldCrops(), stage="vae-style", evaluations={"held_out_styles": renders})
    vae.requires_grad_(False)
    with torch.no_grad():
        sample = StyleWorldCrops(SEED + 40).sample(256, 64)[0]
        latents = torch.cat([vae.encode(b * 2 - 1).latent_dist.mean for b in sample.split(64)])
    scale = round(1.0 / float(latents.std()), 4)
    vae.register_to_config(scaling_factor=scale)
    log({"stage": "scale", "scaling_factor": scale})
    pool = style_pool(vae, pool_size)
    text_encoder.requires_grad_(True)
    train_style_unet(unet, text_encoder, tokenizer, bm.scheduler(), pool, unet_cfg, vae=vae, log=log)
    log({"stage": "held-out", **{f"photos_{k}": v for k, v in evaluate_vae(vae, held_out_images(64)).items()},
         **{f"held_out_styles_{k}": v for k, v in evaluate_vae(vae, renders).items()}})
    tensors = {f"vae.{k}": v for k, v in vae.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    tensors.update({f"unet.tiny-style.{k}": v for k, v in unet.state_dict().items()})
    tensors = {k: (v.half() if v.is_floating_point() else v).detach().contiguous() for k, v in tensors.items()}
    path = out / bm.STYLE_WEIGHTS_NAME
    save_file(tensors, path, metadata={"scaling_factor": str(scale), "seed": str(SEED),
                                       "train_styles": ",".join(s.name for s in TRAIN_STYLES),
                                       "held_out_styles": ",".join(s.name for s in HELD_OUT_STYLES)})
    log({"stage": "done", "weights": str(path), "sha256": bm.sha256(path)})
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-lr", type=float, default=2e-4)
    p.add_argument("--unet-steps", type=int, default=StyleUNetTraining.steps)
    p.add_argument("--batch", type=int, default=StyleUNetTraining.batch)
    p.add_argument("--eval-every", type=int, default=StyleUNetTraining.eval_every)
    p.add_argument("--pool", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    vae_cfg = VAETraining(steps=a.vae_steps, batch=8, crop=64, lr=a.vae_lr, warmup=50, decay=True, lr_min=1e-5,
                          ema=0.99, eval_every=250)
    train_tiny_style(a.out, vae_cfg, StyleUNetTraining(steps=a.unet_steps, batch=a.batch, eval_every=a.eval_every),
                     a.pool)


if __name__ == "__main__":
    main()
