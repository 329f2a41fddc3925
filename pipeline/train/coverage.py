"""Train the coverage built-ins' UNets (``tiny-v``, ``tiny-xl``, ``tiny-xl-inpaint``) and write their shipped weights.

Run ``python -m pipeline.train.coverage --out DIR`` (COVERAGE_WEIGHTS_RECIPE in builtin/build.py; seeded, about
a minute per model on one core). These built-ins exist to cover v-prediction and the SDXL family, not to paint
well, so each UNet gets the quick recipe, `train_tiny_denoiser`: 200 AdamW steps of the standard denoising loss

    L = || f_theta(z_t, t, c) - y_t ||^2,   y_t = eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) z0 for v-prediction

on latents of random crops of scikit-image's photos, conditioned on "a photo" (SDXL: both text encoders, the
pooled embedding and the size ids; a 9-channel inpainting UNet also sees a random box mask and the masked
latent). ``tiny-v`` starts from tiny's shipped VAE and latent scale; ``tiny-xl`` has a VAE of its own (seed 1,
random, its latent scale calibrated here: 1 / std of its latents). The file holds the three UNets and the
latent scales (fp16, a few MB); the VAEs and text encoders are rebuilt from their seeds when loading.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline.data.photos import load_photo
from pipeline.io.images import to_tensor
from pipeline.models.builtin import build as bm
from pipeline.models.diffusion import denoising_loss, text_conditioning
from pipeline.models.fitting import fit


def sample_crops(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """n random square crops of scikit-image's bundled photos, resized to size x size, in [0, 1]."""
    import torch.nn.functional as F

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
    pool = [to_tensor(load_photo(name))[0] for name in names]
    crops = []
    for _ in range(n):
        img = pool[int(torch.randint(len(pool), (1,), generator=generator))]
        side = int(torch.randint(size, min(img.shape[1:]) + 1, (1,), generator=generator))
        top = int(torch.randint(0, img.shape[1] - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, img.shape[2] - side + 1, (1,), generator=generator))
        crop = img[None, :, top : top + side, left : left + side]
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0])
    return torch.stack(crops)


def tiny_conditioning(pipe, batch: int, size: int) -> tuple[torch.Tensor, dict | None]:
    """(c, added_cond_kwargs) for "a photo": SD's last hidden state, or SDXL's two encoders + time ids."""
    embeds, added = text_conditioning(pipe, ["a photo"], size, size)
    return embeds.expand(batch, -1, -1), None if added is None else {k: v.expand(batch, -1) for k, v in added.items()}


def train_tiny_denoiser(pipe, steps: int = 200, batch: int = 16, size: int = 64, calibrate: bool = True) -> None:
    """Calibrate the latent scale and teach the tiny UNet to denoise (in place, seeded).

    The denoising loss is the standard one, || f_theta(z_t, t, c) - y_t ||^2, with y_t the
    scheduler's prediction target (eps, or v for v-prediction: models.prediction_target). For a
    9-channel (inpainting) UNet the input is [z_t, mask, masked latent], with random box masks.
    SDXL-shaped pipelines are conditioned with both text encoders, the pooled embedding and time ids.
    `calibrate=False` keeps the VAE's scaling factor (a trained VAE brings its own).
    """
    gen = torch.Generator().manual_seed(bm.SEED)
    vae, unet, scheduler = pipe.vae, pipe.unet, pipe.scheduler
    with torch.no_grad():
        latents = vae.encode(sample_crops(64, size, gen) * 2 - 1).latent_dist.mean
        if calibrate:
            vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 4))
        cond, added = tiny_conditioning(pipe, batch, size)
    scale = vae.config.scaling_factor

    def loss_at(step):
        with torch.no_grad():
            z = vae.encode(sample_crops(batch, size, gen) * 2 - 1).latent_dist.mean * scale
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        extra = None
        if unet.config.in_channels == 9:
            mask = torch.zeros(batch, 1, *z.shape[2:])
            for m in mask:
                h, w = (int(torch.randint(2, z.shape[2] + 1, (1,), generator=gen)) for _ in range(2))
                m[:, :h, :w] = 1
            extra = torch.cat([mask, z * (1 - mask)], dim=1)
        return denoising_loss(unet, scheduler, z, noise, t, cond, added, extra)

    unet.train()
    fit(unet.parameters(), loss_at, steps=steps, lr=1e-3, weight_decay=0.01)  # plain AdamW at its default decay
    unet.eval()


def train(name: str, steps: int = 200):
    """Built-in `name` (a coverage model) with its UNet trained, as its shipped weights were made."""
    pipe = bm.build_pipeline(name)
    if name == "tiny-v":
        bm.load_trained_vae(pipe)
    train_tiny_denoiser(pipe, steps=steps, calibrate=name != "tiny-v")  # tiny-v keeps tiny's latent scale
    return pipe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for " + bm.COVERAGE_WEIGHTS_NAME)
    p.add_argument("--steps", type=int, default=200, help="training steps per UNet (200: the recipe)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the recipe's figures)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    tensors, scales = {}, {}
    for name in bm.COVERAGE_UNETS:
        pipe = train(name, args.steps)
        tensors.update({f"unet.{name}.{k}": v.half().contiguous() for k, v in pipe.unet.state_dict().items()})
        scales[f"scaling_factor.{name}"] = repr(float(pipe.vae.config.scaling_factor))
        print(f"{name}: trained", flush=True)
    out = Path(args.out) / bm.COVERAGE_WEIGHTS_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=scales)
    print(f"wrote {out} (sha256 {bm.sha256(out)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
