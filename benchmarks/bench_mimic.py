"""Seconds per group for the training mimics (textual inversion, LoRA) at their default settings.

    python -m benchmarks.bench_mimic                                   # CPU, tiny, 64 px
    python -m benchmarks.bench_mimic --model sd15-arch --resolution 512 --device cuda --out mimic_gpu.md

One group = `--images` photos (scikit-image's, resized square). For each mimic: model load
(once, not per group), then per group training (default steps), saving the weights, loading
them back with diffusers' loader and generating the default number of images. The first group
is a warm-up; the median of the next `--repeats` groups is reported. The machine's load average
is recorded, since a shared CPU slows everything down; on a CPU shared with other jobs use
``--threads 1`` (two OpenMP threads per process on an oversubscribed 2-core machine ran 10-40x
slower than one in our measurements).

Writes benchmarks/results/<--out> (markdown) and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def photos(n: int, size: int):
    from skimage import data

    from pipeline.evaluate.mimic.common import resize_square

    pool = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    return [resize_square(pool[i % len(pool)], size) for i in range(n)]


def bench(name: str, mimic, images, repeats: int) -> dict:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats + 1):
            group = f"group{i}"
            t0 = time.perf_counter()
            if name == "textual_inversion":
                from pipeline.evaluate.mimic.textual_inversion import save_embedding

                path = save_embedding(mimic.train(images, group), Path(tmp) / group / "embeds.safetensors")
            else:
                path = mimic.train(images, group, Path(tmp) / group)
            t1 = time.perf_counter()
            mimic.generate(path, group)
            t2 = time.perf_counter()
            runs.append((t1 - t0, t2 - t1))
    measured = runs[1:]  # the first group warms up caches and kernels
    train = statistics.median(r[0] for r in measured)
    gen = statistics.median(r[1] for r in measured)
    return {"train": train, "generate": gen, "total": train + gen}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=4, help="images per group")
    p.add_argument("--repeats", type=int, default=2, help="measured groups (after one warm-up group)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="mimic_cpu.md")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from pipeline.evaluate.mimic import (
        Lora,
        LoraConfig,
        TextualInversion,
        TextualInversionConfig,
    )
    from pipeline.models.loading import model_path

    path = model_path(args.model)
    rows = []
    for name, cls, cfg in (("textual_inversion", TextualInversion, TextualInversionConfig(resolution=args.resolution)),
                           ("lora", Lora, LoraConfig(resolution=args.resolution))):
        t0 = time.perf_counter()
        mimic = cls(path, cfg, device=args.device)
        load = time.perf_counter() - t0
        images = photos(args.images, mimic.resolution)
        result = bench(name, mimic, images, args.repeats)
        steps = cfg.steps
        rows.append((name, mimic.resolution, steps, cfg.num_images, cfg.inference_steps, load, result))
        del mimic

    load_avg = os.getloadavg()
    lines = [
        f"# Training mimics: seconds per group ({args.model}, {args.device})",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, load average {load_avg[0]:.1f} / {load_avg[1]:.1f} / {load_avg[2]:.1f} (1/5/15 min)",
        f"- {'GPU: ' + torch.cuda.get_device_name(0) if args.device.startswith('cuda') else 'CPU only'}",
        f"- group: {args.images} images; median of {args.repeats} groups after one warm-up group",
        "- train = training at the default steps + saving the weights; generate = loading them back with "
        "diffusers' loader + generating the default number of images",
        "",
        "| mimic | resolution | steps | images generated | inference steps | model load s | train s | generate s | total s per group |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res, steps, n, inf, load, r in rows:
        lines.append(f"| {name} | {res} | {steps} | {n} | {inf} | {load:.1f} | {r['train']:.2f} | "
                     f"{r['generate']:.2f} | {r['total']:.2f} |")
    text = "\n".join(lines) + "\n"
    out = Path(__file__).resolve().parent / "results" / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
