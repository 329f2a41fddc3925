"""Transfer: protect with one model (or an ensemble), mimic with another (not a test).

An archive protected against one encoder is protected against one encoder (FastProtect, Ahn et al.
2025, sec. 5: SD 1.5 protections weaken on SD 2.1 and SDXL). This measures it on the built-ins:

- protectors: each of `--protect` (single built-ins) and each ensemble of `--ensembles`
  (``tiny,tiny-xl``: `--model A,B`, per-model directions normalised and summed, engine.py), all
  with `--method` at `--eps` for `--steps` PGD steps; plus uniform noise U(-eps, eps) (``noise``);
- mimics: each of `--mimic`; for every (protector, mimic) pair
  - latent displacement under the *mimic's* encoder, ||E_m(x') - E_m(x)||_2 / ||E_m(x)||_2 (mean);
  - SDEdit damage: the mimic's DDIM edit (flow models: their img2img pipeline's Euler sampler;
    `--strength`, `--ddim-steps`) of the protected image vs
    the clean image, PSNR (lower = more damage), against the same for the clean image's edit.

The built-ins' VAEs are random (issue 10 ships a trained one): ``tiny`` and ``tiny-v`` share the
same random VAE (same config and seed), ``tiny-xl`` has one of its own (another seed, as SDXL's
VAE differs from SD's). So tiny <-> tiny-v transfer goes through one shared encoder, tiny <-> tiny-xl
through different ones. Random encoders measure the mechanism, not real-world strength.

    python -m benchmarks.bench_transfer                       # tiny, tiny-v, tiny-xl at 64 px
    python -m benchmarks.bench_transfer --steps 20 --name transfer_quick
    # SD 1.5-shaped vs FLUX-shaped vs both (issue 21), on the held-out photos:
    python -m benchmarks.bench_transfer --protect tiny,tiny-flux --ensembles tiny+tiny-flux \
        --mimic tiny,tiny-sd3,tiny-flux --held-out --name transfer_flow

Per protector it also reports the cost of one PGD step: seconds per step and image (wall clock, this
machine) and memory (`pipeline/protect/memory.py`): the activations autograd keeps for one step's backward
(the largest member: an ensemble's members are differentiated one after another) and the weights the step
needs on the device (VAE encoder + denoiser, every member).

Writes benchmarks/results/<name>.json and .md (default transfer_cpu) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.io.images import from_batch, to_batch
from pipeline.metrics.visibility import psnr

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def photos(n: int, size: int) -> list[np.ndarray]:
    """n square crops of scikit-image photos at size x size (uint8)."""
    from skimage import data

    from pipeline.evaluate.mimic.common import resize_square

    pool = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry(),
            data.hubble_deep_field()[:512, :512]]
    out = []
    for i in range(n):
        img = pool[i % len(pool)]
        side = min(img.shape[:2]) // (1 + i // len(pool))
        out.append(resize_square(np.ascontiguousarray(img[:side, :side]), size))
    return out


def latents(models, images):
    """The models' latents s E(x) of uint8 images (a torch tensor)."""
    import torch

    from pipeline.protect.methods import encode

    x = to_batch(images)
    with torch.no_grad():
        return encode(models, x).float()


def step_cost(members, config, size: int, seconds_per_step: float) -> dict:
    """ms per step and image (measured), saved activations of the largest member and every member's weights (MiB)."""
    import torch

    from pipeline.protect import build_protector
    from pipeline.protect.memory import module_bytes, saved_bytes_of_step

    x = torch.rand(1, 3, size, size)
    saved = max(saved_bytes_of_step(build_protector(m, config), x) for m in members)
    weights = sum(module_bytes(part) for m in members for part in (m.vae.encoder, m.vae.quant_conv, m.unet)
                  if part is not None)
    return {"step_ms": round(1000 * seconds_per_step, 1), "saved_MiB": round(saved / 2**20, 2),
            "weights_MiB": round(weights / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protect", default="tiny,tiny-v,tiny-xl", help="single protecting models")
    parser.add_argument("--ensembles", default="tiny+tiny-xl,tiny+tiny-v+tiny-xl",
                        help="ensembles, models joined with '+', separated by ','")
    parser.add_argument("--mimic", default="tiny,tiny-v,tiny-xl")
    parser.add_argument("--method", default="sds-")
    parser.add_argument("--eps", type=float, default=16.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--step-size", type=float, default=2.0)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--strength", type=float, default=0.3)
    parser.add_argument("--ddim-steps", type=int, default=20)
    parser.add_argument("--held-out", action="store_true",
                        help="the built-ins' held-out photos (rocket, motorcycle: centre + random crops) instead")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    parser.add_argument("--name", default="transfer_cpu")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from pipeline.evaluate.mimic import SDEdit, SDEditConfig
    from pipeline.models.loading import load_models, model_path
    from pipeline.protect import ProtectConfig, build_protector
    from pipeline.protect.baseline import apply_deltas

    names = sorted(set(args.protect.split(",")) | set(args.mimic.split(","))
                   | {m for e in args.ensembles.split(",") if e for m in e.split("+")})
    loaded = {n: load_models(n, device="cpu", dtype="fp32") for n in names}
    if args.held_out:
        from pipeline.data.photos import held_out_images

        held = held_out_images(args.size, crops_per_photo=max(0, args.images // 2 - 1))
        images = from_batch(held)
    else:
        images = photos(args.images, args.size)
    keys = [f"img{i}" for i in range(len(images))]
    config = ProtectConfig(method=args.method, eps=args.eps, steps=args.steps, step_size=args.step_size, seed=0)

    protected: dict[str, list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    cost: dict[str, dict] = {"noise": {"step_ms": 0.0, "saved_MiB": 0.0, "weights_MiB": 0.0}}
    rng = np.random.default_rng(0)
    protected["noise"] = apply_deltas(images, [rng.uniform(-args.eps, args.eps, im.shape) for im in images])
    seconds["noise"] = 0.0
    protectors = [p for p in args.protect.split(",") if p] + [e for e in args.ensembles.split(",") if e]
    for p in protectors:
        members = [loaded[m] for m in p.split("+")]
        start = time.perf_counter()
        deltas = build_protector(members, config).protect(images, keys=keys)
        seconds[p] = time.perf_counter() - start
        protected[p] = apply_deltas(images, deltas)
        cost[p] = step_cost(members, config, args.size, seconds[p] / (args.steps * len(images)))
        print(f"protected with {p}: {seconds[p]:.1f} s; per step {cost[p]}", flush=True)

    rows = []
    for m in args.mimic.split(","):
        models = loaded[m]
        sdedit = SDEdit(model_path(m), SDEditConfig(strengths=(args.strength,), modes=("ddim",),
                                                   ddim_steps=args.ddim_steps), device="cpu", dtype="fp32")
        z_clean = latents(models, images)
        (clean_edit,) = sdedit.run(images, keys, "clean")
        clean_psnr = float(np.mean([psnr(o, c) for o, c in zip(clean_edit.images, images)]))
        for p, imgs in protected.items():
            z = latents(models, imgs)
            shift = ((z - z_clean).flatten(1).norm(dim=1) / z_clean.flatten(1).norm(dim=1)).mean().item()
            (edit,) = sdedit.run(imgs, keys, "protected")
            damage = float(np.mean([psnr(o, c) for o, c in zip(edit.images, images)]))
            rows.append({"protect": p, "mimic": m, "same_model": m in p.split("+"), "latent_shift": round(shift, 4),
                         "sdedit_psnr": round(damage, 2), "sdedit_psnr_clean": round(clean_psnr, 2),
                         "psnr_drop": round(clean_psnr - damage, 2), "protect_seconds": round(seconds[p], 1),
                         **cost[p]})
            print(json.dumps(rows[-1]), flush=True)

    meta = {"args": vars(args), "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    mimics = args.mimic.split(",")
    lines = [f"# Transfer: {args.method}, eps {args.eps:g}, {args.steps} steps, {args.images} images at {args.size} px",
             "", f"SDEdit s={args.strength:g}, {args.ddim_steps} steps (DDIM; flow models: their own Euler sampler). Cells: latent shift under the mimic's "
             "encoder / PSNR drop of the mimic's edit vs the clean image's edit (dB; higher = more damage). "
             "`*`: the mimic is (one of) the protecting model(s).", "",
             "| protect \\ mimic | " + " | ".join(mimics) + " | ms / step / image | saved MiB / weights MiB |",
             "|---|" + "---|" * (len(mimics) + 2)]
    for p in protected:
        cells = []
        for m in mimics:
            r = next(r for r in rows if r["protect"] == p and r["mimic"] == m)
            cells.append(f"{r['latent_shift']:.3f} / {r['psnr_drop']:.2f}{' *' if r['same_model'] else ''}")
        c = cost[p]
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {c['step_ms']:.0f} | {c['saved_MiB']:.1f} / {c['weights_MiB']:.1f} |")
    lines += ["", f"Machine: {meta['cpus']} CPUs ({args.threads} torch thread(s)), load average "
              f"{meta['load_average'][0]:.1f} at the end; {meta['when']}."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
