"""FastProtect vs sds- (100 PGD steps): milliseconds per image, the ratio, and images per second.

    python -m benchmarks.bench_fastprotect                                   # CPU, tiny, 64 x 64
    python -m benchmarks.bench_fastprotect --model sd15-arch --size 512 --device cuda --sds-images 4

Same model, device, image size and batch for both methods:
1. protector only: `build_protector(...).protect(images)` after one warm-up call, best of
   `--repeats` for fastprotect; sds- with `--sds-steps` (100) runs once (it is the slow one).
2. `protect_encoded` (PNG decode -> protect -> PNG encode -> visibility metrics), fastprotect,
   best of 3.
3. the Ray pipeline (`run_protect`, folder -> folder, local Ray), fastprotect: a warm-up run
   (starts Ray), then N and 2N images; steady state = N extra images / extra seconds (per-run
   start-up cancels out), raw = 2N / wall of the 2N run (Ray already up, actor start included).

The bank: `--bank`, or the model's default bank (tiny: built on first use), or, for other
models, a bank trained here for 2 steps at the image size (timing does not depend on training).
Writes a Markdown table to --out (default benchmarks/results/fastprotect_<device>.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def sample_images(n: int, size: int) -> list[np.ndarray]:
    from PIL import Image

    from pipeline.protect.fastprotect.train import skimage_crops

    crops, _ = skimage_crops(n, seed=11)
    return [np.asarray(Image.fromarray(c).resize((size, size), Image.BICUBIC)) for c in crops]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def bank_for(models, args) -> str | None:
    from pipeline.protect.fastprotect.bank import default_bank_path
    from pipeline.protect.fastprotect.train import (
        TrainConfig,
        load_training_images,
        train_bank,
    )

    if args.bank:
        return args.bank
    if args.model == "tiny" or default_bank_path(args.model).is_file():
        return None  # the default bank (tiny: trained on first use)
    path = Path(tempfile.mkdtemp()) / "timing-bank.safetensors"
    images, summary = load_training_images("skimage", args.size, 8)
    bank, _ = train_bank(models, images, TrainConfig(steps=2, batch_size=1, resolution=args.size), summary, progress=False)
    bank.save(path)
    return str(path)


def pipeline_rate(args, bank: str | None, n: int) -> tuple[float, float]:
    """(raw images/s on 2n images, steady-state images/s) through run_protect."""
    from pipeline.batch.driver import run_protect
    from pipeline.batch.settings import RunSettings
    from pipeline.io.sample_data import png_bytes
    from pipeline.models.loading import ModelSpec
    from pipeline.protect import ProtectConfig
    from pipeline.protect.engine import FastProtectOptions

    root = Path(tempfile.mkdtemp(prefix="bench-fastprotect-"))
    walls = {}
    for label, count in (("warm-up", n), ("n", n), ("2n", 2 * n)):  # the warm-up run starts Ray
        src = root / f"in-{label}"
        src.mkdir()
        for i, img in enumerate(sample_images(count, args.size)):
            (src / f"img{i:05d}.png").write_bytes(png_bytes(img))
        config = ProtectConfig(method="fastprotect", eps=args.eps, fastprotect=FastProtectOptions(bank=bank))
        settings = RunSettings(input=str(src), output=str(root / f"out-{label}"), config=config,
                               model=ModelSpec(args.model, device=args.device, dtype=args.dtype),
                               batch_size=args.batch, progress=False)
        t = time.perf_counter()
        run_protect(settings, log=lambda *a, **k: None)
        walls[label] = time.perf_counter() - t
    return 2 * n / walls["2n"], n / max(walls["2n"] - walls["n"], 1e-9)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--size", type=int, default=64, help="image side (both methods)")
    p.add_argument("--batch", type=int, default=4, help="images per protect() call")
    p.add_argument("--sds-steps", type=int, default=100)
    p.add_argument("--eps", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--encoded-images", type=int, default=32)
    p.add_argument("--pipeline-images", type=int, default=64, help="0 skips the Ray pipeline measurement")
    p.add_argument("--bank", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from pipeline.io.sample_data import png_bytes
    from pipeline.models.loading import load_models
    from pipeline.protect import ProtectConfig, build_protector
    from pipeline.protect.encoded import protect_encoded
    from pipeline.protect.engine import FastProtectOptions

    models = load_models(args.model, device=args.device, dtype=args.dtype)
    device = models.device
    bank = bank_for(models, args)
    images = sample_images(args.batch, args.size)
    fast = build_protector(models, ProtectConfig(method="fastprotect", eps=args.eps, fastprotect=FastProtectOptions(bank=bank)))
    fast.protect(images)  # warm-up (and the default tiny bank, when missing)
    t_fast = timed(lambda: fast.protect(images), device, args.repeats)
    sds = build_protector(models, ProtectConfig(method="sds-", eps=args.eps, steps=args.sds_steps))
    sds.protect(images[:1], ["warm"])  # warm-up: first call allocations, prompt cache
    t_sds = timed(lambda: sds.protect(images, [f"k{i}" for i in range(len(images))]), device, 1)
    ms_fast, ms_sds = 1000 * t_fast / len(images), 1000 * t_sds / len(images)

    pngs = [png_bytes(img) for img in sample_images(args.encoded_images, args.size)]
    keys = [f"e{i}" for i in range(len(pngs))]

    def encoded():
        for i in range(0, len(pngs), args.batch):
            protect_encoded(fast, keys[i : i + args.batch], pngs[i : i + args.batch])

    t_enc = timed(encoded, device, 3)
    rates = pipeline_rate(args, bank, args.pipeline_images) if args.pipeline_images else None

    load = os.getloadavg()
    lines = [
        f"# FastProtect vs sds- ({args.model}, {args.size}x{args.size}, {device}, {str(models.dtype).replace('torch.', '')})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(other jobs share this machine: absolute times are pessimistic, the ratio less so).",
        f"Command: `python -m benchmarks.bench_fastprotect {' '.join(sys.argv[1:])}`. Batch {args.batch}, "
        f"eps {args.eps:g}, bank {'default' if bank is None else bank} (R = {fast.bank.resolution}).",
        "",
        "| measurement | ms / image | images / s |",
        "|---|---:|---:|",
        f"| sds-, {args.sds_steps} steps (protector) | {ms_sds:.1f} | {1000 / ms_sds:.3f} |",
        f"| fastprotect (protector) | {ms_fast:.2f} | {1000 / ms_fast:.1f} |",
        f"| fastprotect via protect_encoded (PNG in/out, metrics) | {1000 * t_enc / len(pngs):.2f} | {len(pngs) / t_enc:.1f} |",
    ]
    if rates:
        lines += [
            f"| fastprotect, Ray pipeline, raw ({2 * args.pipeline_images} images, incl. actor start) | "
            f"{1000 / rates[0]:.1f} | {rates[0]:.2f} |",
            f"| fastprotect, Ray pipeline, steady state | {1000 / rates[1]:.1f} | {rates[1]:.2f} |",
        ]
    lines += ["", f"**Speed-up of fastprotect over sds- ({args.sds_steps} steps): {ms_sds / ms_fast:.0f}x** "
              f"(target >= 100x on CPU with tiny).", ""]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out or Path(__file__).parent / "results" / f"fastprotect_{device.type}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
