"""What the built-in `tiny` has learned, on photos it never saw (not a test).

On ``data.photos.HELD_OUT`` at 64 x 64 (each photo's centre square + random crops), and for
the VAE also on ``UNFAMILIAR`` photos from outside scikit-image (matplotlib's portrait and product shot):

- VAE reconstruction E -> D through the posterior mean: PSNR / SSIM, per photo and overall, next to
  bicubic upsampling of an 8x area-downsampled copy (3 numbers per 8 x 8 block, where the VAE keeps 4:
  a plain signal-processing yardstick for what a 1/8 latent can hold);
- SDEdit of the clean image (DDIM, `--ddim-steps`, guidance 1, the project's `SDEdit`) at strengths
  0.1 / 0.3 / 0.5: PSNR / SSIM of the mimic's output against its input (does the mimic follow it?).

    python -m benchmarks.bench_builtin_tiny            # writes benchmarks/results/builtin_tiny.json
    python -m benchmarks.bench_builtin_tiny --model tiny-style --vae-only   # results/builtin_tiny_style.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.io.images import from_batch

HERE = Path(__file__).resolve().parent


def vae_figures(vae, crops_per_photo: int) -> dict:
    import torch.nn.functional as F

    from pipeline.data import photos
    from pipeline.train import tiny as bt

    out = {}
    unfamiliar = tuple(photos.UNFAMILIAR)
    for names in [(n,) for n in photos.HELD_OUT] + [photos.HELD_OUT] + [(n,) for n in unfamiliar] + [unfamiliar]:
        x = photos.held_out_images(64, crops_per_photo, names=names)
        bicubic = F.interpolate(F.interpolate(x, scale_factor=1 / 8, mode="area"), size=64, mode="bicubic").clamp(0, 1)
        out["+".join(names)] = {"images": len(x), **bt.evaluate_vae(vae, x),
                                "bicubic_8x_psnr": float(bt.psnr(bicubic, x).mean())}
    return out


def sdedit_figures(strengths, ddim_steps: int, images: int) -> dict:
    from pipeline.data import photos
    from pipeline.evaluate.mimic.sdedit import SDEdit, SDEditConfig
    from pipeline.metrics.visibility import psnr, ssim
    from pipeline.models.builtin.build import builtin_model_path

    x = photos.held_out_images(64, crops_per_photo=images // len(photos.HELD_OUT) - 1)
    clean = from_batch(x)
    sdedit = SDEdit(str(builtin_model_path("tiny")),
                    SDEditConfig(strengths=tuple(strengths), modes=("ddim",), ddim_steps=ddim_steps),
                    device="cpu", dtype="fp32")
    outputs = sdedit.run(clean, [f"k{i}" for i in range(len(clean))], source="bench")  # one per strength, in order
    return {str(strength): {"images": len(clean), "psnr": float(np.mean([psnr(a, b) for a, b in zip(clean, o.images)])),
                            "ssim": float(np.mean([ssim(a, b) for a, b in zip(clean, o.images)]))}
            for strength, o in zip(strengths, outputs)}


def main(argv=None) -> dict:
    import torch

    from pipeline.models.builtin.build import BUILTIN_VERSION, weights_file
    from pipeline.models.loading import load_models

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--crops", type=int, default=8, help="random crops per held-out photo for the VAE (plus its centre)")
    p.add_argument("--sdedit-images", type=int, default=4)
    p.add_argument("--ddim-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--model", default="tiny", choices=("tiny", "tiny-style"), help="the trained built-in")
    p.add_argument("--vae-only", action="store_true", help="only the VAE figures")
    p.add_argument("--out", type=Path, default=None, help="default results/builtin_<model>.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    start = time.time()
    models = load_models(a.model, device="cpu", dtype="fp32")
    result = {
        "model": a.model, **dict(zip(("weights", "sha256"), weights_file(a.model))), "builtin_version": BUILTIN_VERSION,
        "vae": vae_figures(models.vae, a.crops),
        "sdedit_clean": None if a.vae_only else sdedit_figures((0.1, 0.3, 0.5), a.ddim_steps, a.sdedit_images),
        "ddim_steps": a.ddim_steps, "seconds": round(time.time() - start, 1),
        "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    a.out = a.out or HERE / "results" / f"builtin_{a.model.replace('-', '_')}.json"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
