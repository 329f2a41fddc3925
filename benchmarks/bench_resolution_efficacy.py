"""Which working resolution protects large images better against mimics that preprocess as real tools do
(issue 27, part 3; not a test).

Photos (scikit-image's, upscaled with Lanczos to about --megapixels, aspect kept: the bundled photos are
small) are protected three ways with the same method, budget and steps:

- `native`: at full size (cost grows as pixels^1.7);
- `auto`: at about the model's training area, aspect kept, optimised through the antialiased resize;
- `square`: on an N x N copy (N = the training side), perturbation mapped back with a bilinear upsample.

Each protected file (rounded to uint8, as written) goes to two mimic preprocessings, on the model's own
training side S:

- `crop` (the diffusers training scripts: `Resize(S)` of the shorter side, antialiased, then
  `CenterCrop(S)`);
- `bucket` (kohya-style aspect buckets: resized to about S^2 pixels with the aspect kept, sides a
  multiple of 64 or of the model's multiple for small models, no crop);

and the mimic is SDEdit in one step at strength --strength (same noise for clean and protected, seeded
by key). Mimic damage = how far the mimic's output on the protected image lands from its output on the
clean image: PSNR between the two (lower: more damage) and the latent shift ||E(x_p) - E(x)|| / ||E(x)||
of the mimic's input. Seconds per image are measured for each protection.

    python -m benchmarks.bench_resolution_efficacy --model tiny --megapixels 1 --steps 10
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def photos(megapixels: float, names) -> dict[str, np.ndarray]:
    from skimage import data

    out = {}
    for name in names:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        scale = math.sqrt(megapixels * 1e6 / (img.width * img.height))
        out[name] = np.asarray(img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS))
    return out


def crop_view(x: torch.Tensor, side: int) -> torch.Tensor:
    """diffusers scripts: shorter side to `side` (bilinear, antialiased), then a centre crop side x side."""
    from pipeline.io.images import resize_pixels

    h, w = x.shape[2:]
    scale = side / min(h, w)
    rh, rw = max(side, round(h * scale)), max(side, round(w * scale))
    y = resize_pixels(x, (rh, rw))
    top, left = (rh - side) // 2, (rw - side) // 2
    return y[:, :, top:top + side, left:left + side]


def bucket_view(x: torch.Tensor, side: int, multiple: int) -> torch.Tensor:
    """kohya-style bucket: about side^2 pixels, aspect kept, sides a multiple of `multiple`."""
    from pipeline.io.images import resize_pixels
    from pipeline.protect.engine import working_size

    return resize_pixels(x, working_size(*x.shape[2:], "auto", multiple, side))


@torch.no_grad()
def sdedit(models, x01: torch.Tensor, key: str, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One-step SDEdit: (decoded x0 prediction in [0, 1], the input's latent)."""
    from pipeline.models.diffusion import predicted_original
    from pipeline.protect.methods import encode
    from pipeline.seeds import key_seed

    z0 = encode(models, x01)
    n = models.scheduler.config.num_train_timesteps
    t = torch.full((1,), int(round(strength * (n - 1))), dtype=torch.long)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(key_seed(0, key, "mimic")))
    z_t = models.scheduler.add_noise(z0, noise.to(z0.dtype), t)
    out = models.unet(z_t, t, encoder_hidden_states=models.encode_prompts(["a photo"])).sample
    z_hat = predicted_original(models.scheduler, z_t, out, t)
    x = models.vae.decode(z_hat / models.latent_scale).sample
    return ((x.float().clamp(-1, 1) + 1) / 2), z0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).pow(2).mean())
    return 99.0 if mse == 0 else 10 * math.log10(1 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--method", default="sds-")
    p.add_argument("--eps", type=float, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--step-size", type=float, default=2.0)
    p.add_argument("--megapixels", type=float, default=1.0)
    p.add_argument("--photos", nargs="+", default=["chelsea", "coffee", "astronaut"])
    p.add_argument("--strength", type=float, default=0.3)
    p.add_argument("--resolutions", nargs="+", default=["native", "auto", "square"])
    p.add_argument("--name", default=None)
    args = p.parse_args()

    from pipeline.io.images import to_tensor
    from pipeline.models.loading import load_models
    from pipeline.protect import ProtectConfig, build_protector

    models = load_models(args.model, device="cpu", dtype="fp32")
    side, multiple = models.training_side, models.pixel_multiple
    images = photos(args.megapixels, args.photos)
    rows = []
    for resolution in args.resolutions:
        res = str(side) if resolution == "square" else resolution
        protector = build_protector(models, ProtectConfig(method=args.method, eps=args.eps, steps=args.steps,
                                                          step_size=args.step_size, resolution=res))
        for name, rgb in images.items():
            start = time.perf_counter()
            (delta,) = protector.protect([rgb], keys=[name])
            seconds = time.perf_counter() - start
            written = np.clip(rgb.astype(np.float32) + np.round(delta), 0, 255).astype(np.uint8)
            assert np.abs(written.astype(int) - rgb.astype(int)).max() <= args.eps
            clean, protected = to_tensor(rgb), to_tensor(written)
            for view_name, view in (("crop", lambda x: crop_view(x, side)),
                                    ("bucket", lambda x: bucket_view(x, side, multiple))):
                out_c, z_c = sdedit(models, view(clean), name, args.strength)
                out_p, z_p = sdedit(models, view(protected), name, args.strength)
                rows.append({"resolution": resolution, "photo": name, "size": list(rgb.shape[:2]), "mimic": view_name,
                             "seconds": seconds, "psnr_mimic": psnr(out_c, out_p),
                             "latent_shift": float((z_p - z_c).norm() / z_c.norm())})
            print(f"{resolution:>7} {name:>10} {rgb.shape[1]}x{rgb.shape[0]}: {seconds:.1f} s; "
                  + ", ".join(f"{r['mimic']} PSNR {r['psnr_mimic']:.2f} dB shift {r['latent_shift']:.3f}"
                              for r in rows[-2:]), flush=True)
    lines = [f"# bench_resolution_efficacy: {args.model}, {args.method}, eps {args.eps:g}, {args.steps} steps, "
             f"{args.megapixels:g} MP photos ({', '.join(args.photos)}), SDEdit one step at strength {args.strength:g}", "",
             "| protection at | s / image | crop mimic: PSNR(mimic clean, mimic protected) dB | crop: latent shift "
             "| bucket mimic: PSNR dB | bucket: latent shift |", "|---|---|---|---|---|---|"]
    for resolution in args.resolutions:
        sub = [r for r in rows if r["resolution"] == resolution]

        def mean(key, mimic):
            vals = [r[key] for r in sub if r["mimic"] == mimic]
            return sum(vals) / len(vals)

        lines.append(f"| {resolution} | {sum(r['seconds'] for r in sub) / len(sub):.1f} | {mean('psnr_mimic', 'crop'):.2f} | "
                     f"{mean('latent_shift', 'crop'):.3f} | {mean('psnr_mimic', 'bucket'):.2f} | {mean('latent_shift', 'bucket'):.3f} |")
    name = args.name or f"resolution_efficacy_{args.model}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
