"""Seconds per PGD step and peak memory against image size, `native` against `auto` (issue 27; not a test).

Each (method, size, resolution) runs in a fresh subprocess: one warm-up `protect` call of one step on
an image of that size (allocator, prompt cache, target latent), then a timed call of `--steps` steps;
seconds per step = timed wall time / steps (the conversions and, for `auto`, the resize of each step are
included: they are part of the cost). Beside it: the run's own estimate for that image (`protect.cost.
estimate`, as the pre-run warning computes it) divided by the measured time, and the memory model's peak
(`protect.cost.step_cost`, what `--max-memory` is checked against). Peak memory: resident set size polled every 5 ms during the timed
call minus the RSS before it (CPU), or torch.cuda.max_memory_allocated() minus the allocation before it.

    python -m benchmarks.bench_resolution                      # tiny on CPU: sds- and photoguard
    python -m benchmarks.bench_resolution --model sd15-arch --device cuda --dtype fp16 --native-max-mp 4

`native` is skipped above --native-max-mp megapixels (on this 2-core CPU a 1024^2 native step of tiny
takes about 15 s and grows as pixels^1.7). The exponent of the native curve is fitted by least squares
on log(seconds) against log(pixels). Results: benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SIZES = [(256, 256), (512, 512), (683, 1024), (1024, 1024), (1080, 1920), (2000, 3000), (3072, 4096)]  # h x w


def measure(cfg: dict) -> dict:
    import threading

    import numpy as np
    import psutil
    import torch
    from PIL import Image
    from skimage import data

    from pipeline.models.loading import load_models
    from pipeline.protect import ProtectConfig, build_protector
    from pipeline.protect.cost import estimate, step_cost

    models = load_models(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
    h, w = cfg["size"]
    image = np.asarray(Image.fromarray(data.chelsea()).resize((w, h), Image.Resampling.BILINEAR))

    def protector(steps):
        return build_protector(models, ProtectConfig(method=cfg["method"], steps=steps, resolution=cfg["resolution"]))

    protector(1).protect([image], keys=["warm"])
    timed = protector(cfg["steps"])
    working = timed.working_size(h, w)
    proc, peak, stop = psutil.Process(), [0], threading.Event()
    cuda = models.device.type == "cuda"

    def poll():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    base = proc.memory_info().rss
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    start = time.perf_counter()
    (delta,) = timed.protect([image], keys=["timed"])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    used = (torch.cuda.max_memory_allocated() - base) if cuda else max(peak[0] - base, 0)
    assert delta.shape == (h, w, 3) and abs(delta).max() <= 16 + 1e-6
    guess = estimate(timed, h, w)  # what the run's warning would have said (pipeline/protect/cost.py)
    return {**cfg, "working": list(working), "s_per_step": seconds / cfg["steps"], "peak_mb": used / 2**20,
            "measured_s": seconds, "estimate_s": guess.seconds_per_image,
            "model_mb": step_cost(timed, h, w).peak_bytes / 2**20}


def fit_exponent(rows: list[dict]) -> float | None:
    pts = [(math.log(r["size"][0] * r["size"][1]), math.log(r["s_per_step"])) for r in rows]
    if len(pts) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--methods", nargs="+", default=["sds-", "photoguard"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--native-max-mp", type=float, default=1.1, help="skip native above this many megapixels")
    p.add_argument("--name", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return
    rows = []
    for method in args.methods:
        for size in SIZES:
            for resolution in ("native", "auto"):
                if resolution == "native" and size[0] * size[1] > args.native_max_mp * 1e6:
                    continue
                cfg = {"model": args.model, "device": args.device, "dtype": args.dtype, "method": method,
                       "size": list(size), "resolution": resolution, "steps": args.steps}
                out = subprocess.run([sys.executable, "-m", "benchmarks.bench_resolution", "--worker", json.dumps(cfg)],
                                     capture_output=True, text=True, cwd=HERE.parent)
                if out.returncode != 0:
                    print(f"{method} {size} {resolution}: failed\n{out.stderr[-800:]}", file=sys.stderr)
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{method:>10} {size[0]:>4}x{size[1]:<4} {resolution:>6} -> {row['working'][0]}x{row['working'][1]}: "
                      f"{row['s_per_step']:.3f} s/step, {row['peak_mb']:.0f} MB", flush=True)
    name = args.name or f"resolution_{args.model}_{args.device}"
    RESULTS.mkdir(exist_ok=True)
    meta = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": __import__("os").cpu_count()}
    lines = [f"# bench_resolution: {args.model} on {args.device} ({args.dtype}), {meta['when']}", "",
             "| method | image (h x w) | MP | resolution | working size | s / step | peak MB (measured) | MB (memory model) "
             "| estimate / measured |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['size'][0]} x {r['size'][1]} | {r['size'][0] * r['size'][1] / 1e6:.2f} | "
                     f"{r['resolution']} | {r['working'][0]} x {r['working'][1]} | {r['s_per_step']:.3f} | {r['peak_mb']:.0f} | "
                     f"{r['model_mb']:.0f} | {r['estimate_s'] / r['measured_s']:.2f} |")
    lines.append("")
    for method in args.methods:
        for resolution in ("native", "auto"):
            sub = [r for r in rows if r["method"] == method and r["resolution"] == resolution]
            k = fit_exponent(sub)
            if k is not None:
                lines.append(f"- {method}, {resolution}: seconds per step ~ pixels^{k:.2f} "
                             f"({sub[0]['size'][0]}x{sub[0]['size'][1]} to {sub[-1]['size'][0]}x{sub[-1]['size'][1]})")
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
