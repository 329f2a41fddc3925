"""The adaptive attacks of issue 22 on CPU with the built-in models: what they do and what they cost.

    python -m benchmarks.bench_adaptive_attacks            # -> benchmarks/results/adaptive_attacks_cpu.json

- `tiny-pixel` (pdmpure's pixel DDPM): PSNR to the clean held-out photos of x_t and of the one-step x0
  prediction from it, t = 50, 100, 200; and of `noise:SIGMA` followed by `pdmpure:T`.
- CAT (`cat:STEPS`, default photoguard at eps 16 with the study's default protect settings): the mean squared
  distance between the encoder's posterior means of protected and clean held-out images, before and with
  the adapters, for protections by photoguard and sds- at eps 16 (100 steps), and how far the adapters move
  clean latents; the seconds its training takes.
- seconds per 64 x 64 image of diffpure:0.1, gridpure:0.01 and pdmpure:0.1 on tiny.

Held-out photos: `pipeline.data.photos.HELD_OUT` (rocket, motorcycle), never seen by tiny,
tiny-pixel or CAT's attacker (whose own images are crops of the training photos).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from pipeline.io.images import from_batch
from pipeline.metrics.visibility import psnr

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MIMICSHIELD_CACHE", str(ROOT / ".cache" / "mimicshield"))
RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None) -> None:
    import torch

    from pipeline.data.photos import held_out_images
    from pipeline.models.builtin.pixel import builtin_pixel_path
    from pipeline.protect import ProtectConfig, build_protector
    from pipeline.study.purify import PurifyContext, parse_purification
    from pipeline.study.purify.cat import posterior_mean
    from pipeline.study.purify.impress import vae_models
    from pipeline.study.purify.pdmpure import load_pixel_model
    from pipeline.train.pixel import denoising_psnr

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--crops", type=int, default=3, help="random crops per held-out photo (besides its centre)")
    p.add_argument("--cat", default="cat:100")
    p.add_argument("--protect-steps", type=int, default=100)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    x = held_out_images(64, a.crops)
    images = from_batch(x)
    keys = [f"h{i}" for i in range(len(images))]
    out: dict = {"images": len(images), "size": 64}

    unet, scheduler = load_pixel_model(builtin_pixel_path(), "cpu", "fp32")
    out["tiny_pixel_one_step"] = denoising_psnr(unet, scheduler, x)
    context = PurifyContext(model="tiny", device="cpu", dtype="fp32", attack=ProtectConfig(steps=a.protect_steps))
    pdm = {}
    for sigma in (0.05, 0.1):
        noisy = parse_purification(f"noise:{sigma}").apply(images, keys)
        pdm[f"noise:{sigma}"] = round(np.mean([psnr(n, c) for n, c in zip(noisy, images)]), 2)
        for t in (0.05, 0.1, 0.2):
            purified = parse_purification(f"pdmpure:{t}").apply(noisy, keys, context=context)
            pdm[f"noise:{sigma} + pdmpure:{t}"] = round(np.mean([psnr(o, c) for o, c in zip(purified, images)]), 2)
    out["pdmpure_psnr_to_clean"] = pdm

    seconds = {}
    for spec in ("diffpure:0.1", "gridpure:0.01", "pdmpure:0.1"):
        unit = parse_purification(spec)
        unit.apply(images[:1], keys[:1], context=context)  # load once
        t0 = time.perf_counter()
        purified = unit.apply(images, keys, context=context)
        seconds[spec] = round((time.perf_counter() - t0) / len(images), 3)
        out.setdefault("psnr_to_input", {})[spec] = round(np.mean([psnr(o, c) for o, c in zip(purified, images)]), 2)
    out["purify_seconds_per_image"] = seconds

    unit = parse_purification(a.cat)
    t0 = time.perf_counter()
    tensors = unit.adaptation(context, seed=0)
    out["cat"] = {"spec": unit.spec, "train_seconds": round(time.perf_counter() - t0, 1),
                  "attacker": {"images": unit.config.images, "eps": context.attack_eps, "steps": a.protect_steps}}
    models = vae_models(context)
    vae = models.vae
    with torch.no_grad():
        clean = posterior_mean(vae, images)
        with unit.adapted(vae, tensors):
            out["cat"]["clean_drift"] = round((posterior_mean(vae, images) - clean).pow(2).mean().item(), 4)
    for method in ("photoguard", "sds-"):
        deltas = build_protector(models, ProtectConfig(method=method, eps=16, steps=a.protect_steps)).protect(images, keys)
        protected = [np.clip(im + np.rint(d), 0, 255).astype(np.uint8) for im, d in zip(images, deltas)]
        with torch.no_grad():
            before = (posterior_mean(vae, protected) - clean).pow(2).mean().item()
            with unit.adapted(vae, tensors):
                after = (posterior_mean(vae, protected) - clean).pow(2).mean().item()
        out["cat"][f"{method}_eps16_latent_mse"] = {"before": round(before, 4), "with_adapters": round(after, 4),
                                                    "ratio": round(after / before, 3)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "adaptive_attacks_cpu.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
