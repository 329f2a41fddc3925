"""Seconds per PGD step and peak memory of every protection method (not a test).

Each configuration (model, resolution, method, batch size, device, dtype) is measured in a fresh
subprocess, so one configuration's allocations never inflate the next one's peak:

- time: `warmup` PGD steps first (allocator, kernels, target latent, prompt cache), then `steps`
  timed steps; seconds per step = timed wall time / steps;
- memory on CPU: resident set size (psutil) polled every few milliseconds during the steps,
  minus the RSS after the model was loaded: the working memory protection needs on top of the
  weights (the weights themselves are reported as `rss_after_load_mb`);
- memory on CUDA: torch.cuda.max_memory_allocated() (weights included) and the same minus what
  was allocated after loading.

Examples::

    python -m benchmarks.bench_methods --preset cpu                 # tiny@64 and sd15-arch@256 on CPU
    python -m benchmarks.bench_methods --preset gpu                 # sd15-arch@512, sd21-768-arch@768, sdxl-arch@1024 on CUDA, fp16
    python -m benchmarks.bench_methods --model tiny --resolution 64 --batch-sizes 1 8 --methods sds- advdm

Results go to benchmarks/results/<name>.json and .md (see --name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ("advdm", "advdm-", "photoguard", "mist", "sds+", "sds-", "sdst-")

PRESETS = {
    # (model, resolution, batch sizes, device, dtype)
    "cpu": [("tiny", 64, (1, 8), "cpu", "fp32"), ("sd15-arch", 256, (1, 8), "cpu", "fp32")],
    "gpu": [("sd15-arch", 512, (1, 8), "cuda", "fp16"),
            # issue 14: SD 2.1 768 (v-prediction) and SDXL at their native sizes; SDXL's VAE stays fp32 under
            # fp16 (about 13 GiB of saved activations per 1024 px image for sds-: bench_memory_model.py)
            ("sd21-768-arch", 768, (1, 4), "cuda", "fp16"), ("sdxl-arch", 1024, (1, 2), "cuda", "fp16")],
}


# ---------------------------------------------------------------- one configuration (worker process)


def measure(cfg: dict) -> dict:
    """Run `cfg` in this process and return its figures."""
    import gc
    import resource
    import threading

    import numpy as np
    import psutil
    import torch
    from PIL import Image
    from skimage import data

    from pipeline.io.images import to_batch
    from pipeline.models.loading import load_models
    from pipeline.protect import ProtectConfig, build_protector

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    proc = psutil.Process()
    t_load = time.perf_counter()
    kwargs = {"low_memory": True} if cfg.get("low_memory") else {}
    models = load_models(cfg["model"], device=cfg["device"], dtype=cfg["dtype"], **kwargs)
    load_seconds = time.perf_counter() - t_load
    cuda = models.device.type == "cuda"

    res, batch = cfg["resolution"], cfg["batch"]
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    images = [
        np.asarray(Image.fromarray(photos[i % len(photos)]).resize((res, res), Image.Resampling.BILINEAR))
        for i in range(batch)
    ]
    x = to_batch(images)
    keys, prompts = [f"bench-{i}" for i in range(batch)], ["a photo"] * batch

    protector = build_protector(models, ProtectConfig(method=cfg["method"], steps=cfg["warmup"]))
    models.encode_prompts(prompts)
    gc.collect()
    rss_base = proc.memory_info().rss
    maxrss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()

    peak = {"rss": rss_base}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)
            stop.wait(0.003)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        if cfg["warmup"]:
            protector.protect_tensor(x, keys, prompts)
        protector.config.steps = cfg["steps"]
        if cuda:
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        protector.protect_tensor(x, keys, prompts)
        if cuda:
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        stop.set()
        poller.join()
    out = {
        **cfg,
        "seconds_per_step": seconds / max(cfg["steps"], 1),
        "seconds_per_image_step": seconds / max(cfg["steps"], 1) / batch,
        # CPU time of this process (all its threads): less sensitive than wall time to other work
        # on a shared machine; with --threads 1 it is the compute cost itself
        "cpu_seconds_per_step": cpu_seconds / max(cfg["steps"], 1),
        "load_seconds": load_seconds,
        "rss_after_load_mb": rss_base / 2**20,
        "peak_extra_mb": (peak["rss"] - rss_base) / 2**20,
        "peak_rss_mb": peak["rss"] / 2**20,
        "maxrss_extra_mb": max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - maxrss_base) / 2**20,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine skews CPU timings
        "device_name": torch.cuda.get_device_name(models.device) if cuda else platform.processor() or "cpu",
    }
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_peak_extra_mb"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
        out["peak_extra_mb"] = out["cuda_peak_extra_mb"]
    return out


def run_isolated(cfg: dict, timeout: float) -> dict:
    """`measure(cfg)` in a fresh Python process; returns its result or an error record."""
    cmd = [sys.executable, "-m", "benchmarks.bench_methods", "--worker", json.dumps(cfg)]
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**cfg, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------- driver


def run_suite(suites, methods, args) -> list[dict]:
    rows = []
    for model, resolution, batches, device, dtype in suites:
        for method in methods:
            last = None  # (batch, seconds per step) of the previous batch size of this method
            for batch in batches:
                note = None
                if last is not None and last[1] * batch / last[0] > args.max_step_seconds:
                    # too slow: measure batch 2 instead (once), and say so
                    note = (f"batch {batch} skipped: estimated {last[1] * batch / last[0]:.0f} s/step "
                            f"> {args.max_step_seconds:.0f} s; batch 2 measured instead")
                    batch = 2
                    if batch <= last[0]:
                        rows.append({"model": model, "resolution": resolution, "method": method, "batch": batches[-1],
                                     "device": device, "dtype": dtype, "error": note})
                        continue
                cfg = {"model": model, "resolution": resolution, "method": method, "batch": batch, "device": device,
                       "dtype": dtype, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                       "low_memory": args.low_memory}
                t0 = time.perf_counter()
                row = run_isolated(cfg, timeout=args.timeout)
                if note:
                    row["note"] = note
                rows.append(row)
                status = row.get("error") or (
                    f"{row['seconds_per_step']:.3f} s/step, +{row['peak_extra_mb']:.0f} MB peak "
                    f"({time.perf_counter() - t0:.0f} s incl. load)"
                )
                print(f"{model}@{resolution} {device}/{dtype} {method:>10} batch {batch}: {status}", flush=True)
                if "error" not in row:
                    last = (batch, row["seconds_per_step"])
    return rows


def ratio(rows: list[dict], suite: tuple, batch: int, key: str, num: str = "sds-", den: str = "advdm"):
    pick = {r["method"]: r for r in rows if (r["model"], r["resolution"], r["device"]) == suite
            and r["batch"] == batch and "error" not in r}
    if num in pick and den in pick and pick[den][key] > 0:
        return pick[num][key] / pick[den][key]
    return None


def markdown(rows: list[dict], meta: dict) -> str:
    max_step_seconds = meta.get("max_step_seconds", 60.0)
    lines = [f"# Protection methods: seconds per PGD step and peak memory ({meta['name']})", ""]
    lines += [
        f"Measured {meta['date']} on {meta['host']}; torch {meta['torch']}; {meta['steps']} timed steps after "
        f"{meta['warmup']} warm-up step(s); each configuration in a fresh process. Memory = peak working memory "
        "on top of the loaded model (CPU: resident set size polled every 3 ms, minus RSS after loading; "
        "CUDA: torch.cuda.max_memory_allocated minus what was allocated after loading). Built-in models have "
        "random (sd15-arch) or toy (tiny) weights: the figures measure cost, not protection strength.",
        "",
    ]
    suites = list(dict.fromkeys((r["model"], r["resolution"], r["device"], r["dtype"]) for r in rows))
    for model, res, device, dtype in suites:
        sub = [r for r in rows if (r["model"], r["resolution"], r["device"], r["dtype"]) == (model, res, device, dtype)]
        batches = sorted({r["batch"] for r in sub if "error" not in r})
        lines += [f"## {model} at {res}x{res}, {device}, {dtype}", ""]
        head = (["method"] + [f"wall s/step b{b}" for b in batches] + [f"CPU s/step b{b}" for b in batches]
                + [f"peak MB b{b}" for b in batches])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in dict.fromkeys(r["method"] for r in sub):
            cells = [method]
            by_batch = {r["batch"]: r for r in sub if r["method"] == method and "error" not in r}
            cells += [f"{by_batch[b]['seconds_per_step']:.3f}" if b in by_batch else "-" for b in batches]
            cells += [f"{by_batch[b].get('cpu_seconds_per_step', float('nan')):.3f}" if b in by_batch else "-"
                      for b in batches]
            cells += [f"{by_batch[b]['peak_extra_mb']:.0f}" if b in by_batch else "-" for b in batches]
            lines.append("| " + " | ".join(cells) + " |")
        loads = [r["rss_after_load_mb"] for r in sub if "rss_after_load_mb" in r]
        threads = sorted({r["torch_threads"] for r in sub if "torch_threads" in r})
        busy = [r["load_average_1min"] for r in sub if "load_average_1min" in r]
        if loads:
            lines += ["", f"Model resident after loading: about {max(loads):.0f} MB; torch threads {threads}; "
                      f"machine load average (1 min) during the runs {min(busy):.1f} to {max(busy):.1f}."]
        suite = (model, res, device)
        for b in batches:
            t, m = ratio(sub, suite, b, "seconds_per_step"), ratio(sub, suite, b, "peak_extra_mb")
            c = ratio(sub, suite, b, "cpu_seconds_per_step") if all("cpu_seconds_per_step" in r for r in sub if "error" not in r) else None
            if t is not None:
                lines.append(f"- batch {b}: SDS(-)/AdvDM wall time {t:.2f}" + (f", CPU time {c:.2f}" if c else "")
                             + f", peak memory {m:.2f}")
        skipped = [r["method"] for r in sub if r.get("note")]
        if skipped:
            wanted = sorted({r["note"].split()[1] for r in sub if r.get("note")})
            lines.append(f"- batch {'/'.join(wanted)} not run for {', '.join(skipped)}: estimated over "
                         f"{max_step_seconds:.0f} s per step; batch 2 measured instead")
        lines += [f"- error: {r['method']} batch {r['batch']}: {r['error']}" for r in sub if r.get("error")]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a predefined set of configurations")
    p.add_argument("--model", default="tiny", help="model id or built-in (default tiny)")
    p.add_argument("--resolution", type=int, default=64, help="square image side (default 64)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--steps", type=int, default=2, help="timed PGD steps (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--low-memory", action="store_true", help="load_models(low_memory=True) (gradient checkpointing)")
    p.add_argument("--max-step-seconds", type=float, default=60.0,
                   help="if a larger batch would exceed this many s/step, measure batch 2 instead (default 60)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration (default 1800)")
    p.add_argument("--name", default=None, help="results file name (default: methods_<preset or device>)")
    p.add_argument("--render", nargs="+", metavar="JSON", help="only re-render (and merge) earlier results files")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0

    import torch

    if args.render:
        loaded = [json.loads(Path(f).read_text()) for f in args.render]
        meta = dict(loaded[0]["meta"], name=args.name or loaded[0]["meta"]["name"])
        rows = [row for part in loaded for row in part["rows"]]
        return write_results(rows, meta)

    suites = PRESETS[args.preset] if args.preset else [
        (args.model, args.resolution, tuple(args.batch_sizes), args.device, args.dtype)
    ]
    if args.preset == "gpu" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure for --preset gpu", file=sys.stderr)
        return 1
    name = args.name or f"methods_{args.preset or args.device}"
    rows = run_suite(suites, args.methods, args)
    meta = {"name": name, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": f"{platform.machine()}, {os.cpu_count()} CPU cores", "torch": torch.__version__,
            "steps": args.steps, "warmup": args.warmup, "max_step_seconds": args.max_step_seconds}
    return write_results(rows, meta)


def write_results(rows: list[dict], meta: dict) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{meta['name']}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    text = markdown(rows, meta)
    (RESULTS / f"{meta['name']}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
