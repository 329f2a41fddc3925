"""Pipeline throughput vs the protector alone, and the driver's memory and traffic vs the number of shards.

    python -m benchmarks.bench_pipeline --method fastprotect          # CPU, tiny model, 64 px
    python -m benchmarks.bench_pipeline --method sds- --steps 30
    python -m benchmarks.bench_pipeline --method sds- --model sd15-arch --size 512 --steps 20 --device cuda  # GPU

1. Throughput. The same images (WebDataset shards), model, method and batch size go
   (a) through the whole pipeline (`run_protect`: read -> decode -> protection actors -> encode + write
       in workers -> driver commits), on N and on 2N images: steady state = N / (t(2N) - t(N)), which
       cancels the start-up (Ray Data planning, actor start, model load);
   (b) through the protector alone: `build_protector(...).protect(rgbs, keys)` on the decoded images, in
       batches of --batch-size, in a process with the actor's thread count (what the actor's work costs
       with no pipeline around it); and through one `ProtectActor` (a Ray actor with the pipeline's
       resources) fed ready-decoded Arrow batches.
   ratio = pipeline steady images/s / protector images/s. Each figure is the median of --repeats.
2. Driver. Peak RSS of the driver process alone and the bytes of result rows it received
   (`RunSummary.driver_bytes`), protecting 4 and 40 shards of the same images, each in a fresh process
   with its own Ray: flat when the driver never holds image bytes.

Writes benchmarks/results/bench_pipeline_<method>.json and prints a table. The machine's load
average is recorded with each figure (a shared 2-core machine is noisy).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MIMICSHIELD_CACHE", str(ROOT / ".cache" / "mimicshield"))


def make_shards(root: Path, shards: int, per_shard: int, size: int) -> None:
    from pipeline.io.sample_data import photo_samples, shard_bytes

    root.mkdir(parents=True, exist_ok=True)
    samples = photo_samples(shards * per_shard, sizes=((size, size),))
    for s in range(shards):
        (root / f"shard-{s:06d}.tar").write_bytes(shard_bytes(samples[s * per_shard : (s + 1) * per_shard]))


def spec(args):
    from pipeline.models.loading import ModelSpec

    return ModelSpec(args.model, device=args.device, dtype=args.dtype)


def config(args, steps: int | None = None):
    from pipeline.protect import ProtectConfig

    return ProtectConfig(method=args.method, steps=args.steps if steps is None else steps, eps=16, step_size=1)


def settings(args, src: Path, dst: Path, steps: int | None = None):
    from pipeline.batch.settings import RunSettings

    return RunSettings(input=str(src), output=str(dst), model=spec(args), config=config(args, steps),
                       batch_size=args.batch_size, progress=False)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def decoded_images(src: Path) -> tuple[list, list[str]]:
    import tarfile

    from pipeline.io.images import decode_image

    images, keys = [], []
    for shard in sorted(src.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    images.append(decode_image(tar.extractfile(m).read()).rgb)
                    keys.append(m.name[:-4])
    return images, keys


def protector_rate(args, images, keys, threads: int) -> float:
    """images/s of protector.protect alone, this process, `threads` torch threads, after a warm-up batch."""
    import torch

    from pipeline.protect import build_protector

    torch.set_num_threads(threads)
    protector = build_protector(spec(args).on("cuda" if args.device == "auto" and torch.cuda.is_available()
                                              else args.device).load(), config(args))
    b = args.batch_size
    protector.protect(images[:b], keys[:b])  # warm-up (first-call allocations, bank, target latents)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(images), b):
        protector.protect(images[i : i + b], keys[i : i + b])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - t0)


def actor_rate(args, src: Path, s) -> float:
    """images/s of one ProtectActor (Ray actor, pipeline resources) on ready-decoded Arrow batches."""
    import pyarrow as pa
    import ray

    from pipeline.batch.commit import UnitIndex, plan_units
    from pipeline.batch.driver import actor_options
    from pipeline.batch.stages import Decoder, ProtectActor
    from pipeline.io.samples import read_samples

    rows = read_samples(str(src)).take_all()
    paths = sorted({r["source"] for r in rows})
    index = UnitIndex("shards", plan_units("shards", paths, str(src), "/tmp/unused"))
    table = pa.Table.from_pylist([{**r, "member_names": [], "member_data": []} for r in rows])
    batches = [Decoder(index)(table.slice(i, s.batch_size)) for i in range(0, len(rows), s.batch_size)]
    options, _ = actor_options(s)
    threads = options.pop("_threads", None)
    cls = ray.remote(num_cpus=options.get("num_cpus", 1), num_gpus=options.get("num_gpus", 0))(ProtectActor)
    model = s.model.on("cuda") if options.get("num_gpus") and s.model.device == "auto" else s.model
    actor = cls.remote(model, s.config, threads)
    ray.get(actor.__call__.remote(batches[0]))  # warm-up (also loads the model)
    t0 = time.perf_counter()
    ray.get([actor.__call__.remote(b) for b in batches])
    seconds = time.perf_counter() - t0
    ray.kill(actor)
    return len(rows) / seconds


def bench_throughput(args) -> dict:
    from pipeline.batch.driver import actor_options, ensure_ray, run_protect

    out = {"pipeline_steady": [], "pipeline_raw": [], "protector": [], "actor": [], "load": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src, src2 = tmp / "in", tmp / "in2"
        make_shards(src, args.shards, args.per_shard, args.size)
        make_shards(src2, 2 * args.shards, args.per_shard, args.size)
        n = args.shards * args.per_shard
        ray = ensure_ray(None)
        s = settings(args, src, tmp / "out")
        s.model.check()
        options, device = actor_options(s)
        threads = options.get("_threads") or 1
        warm = tmp / "warm"
        make_shards(warm, 1, s.batch_size, args.size)
        run_protect(settings(args, warm, tmp / "warm-out"), log=lambda m: None)  # one-time costs (bank, caches)
        images, keys = decoded_images(src)
        for r in range(args.repeats):
            out["load"].append(load())
            t0 = time.perf_counter()
            summary = run_protect(settings(args, src, tmp / f"out-{r}"), log=lambda m: None)
            t1 = time.perf_counter() - t0
            assert summary.samples_written == n, summary
            t0 = time.perf_counter()
            summary = run_protect(settings(args, src2, tmp / f"out2-{r}"), log=lambda m: None)
            t2 = time.perf_counter() - t0
            assert summary.samples_written == 2 * n, summary
            out["pipeline_raw"].append(2 * n / t2)
            out["pipeline_steady"].append(n / max(t2 - t1, 1e-9))
            out["actor"].append(actor_rate(args, src, s))
            out["protector"].append(protector_rate(args, images, keys, threads))
        ray.shutdown()
    med = {k: round(statistics.median(v), 3) for k, v in out.items()}
    return {
        "images": n, "device": device, "threads": threads, "runs": {k: [round(x, 3) for x in v] for k, v in out.items()},
        "pipeline_steady_images_per_s": med["pipeline_steady"], "pipeline_raw_images_per_s": med["pipeline_raw"],
        "protector_images_per_s": med["protector"], "actor_images_per_s": med["actor"],
        "ratio_steady_vs_protector": round(med["pipeline_steady"] / med["protector"], 3),
        "ratio_steady_vs_actor": round(med["pipeline_steady"] / med["actor"], 3),
        "load_average": med["load"],
    }


def _driver_child(args, shards: int, queue) -> None:
    import psutil

    from pipeline.batch.driver import ensure_ray, run_protect

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        make_shards(src, shards, args.mem_per_shard, args.size)
        input_bytes = sum(p.stat().st_size for p in src.glob("*.tar"))
        ensure_ray(None)
        me = psutil.Process()
        peak, done = 0, threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, me.memory_info().rss)
                time.sleep(0.05)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        before = me.memory_info().rss
        summary = run_protect(settings(args, src, Path(tmp) / "out", steps=args.mem_steps), log=lambda m: None)
        done.set()
        t.join()
        queue.put({"shards": shards, "images": summary.samples_written, "input_mib": round(input_bytes / 2**20, 2),
                   "driver_rss_before_mib": round(before / 2**20), "driver_peak_rss_mib": round(peak / 2**20),
                   "driver_bytes_received": summary.driver_bytes,
                   "driver_bytes_per_image": round(summary.driver_bytes / max(summary.samples_in, 1), 1),
                   "seconds": round(summary.seconds, 1), "load_average": load()})


def bench_driver(args, shards: int) -> dict:
    ctx = mp.get_context("spawn")  # a fresh Ray per measurement
    queue = ctx.Queue()
    proc = ctx.Process(target=_driver_child, args=(args, shards, queue))
    proc.start()
    try:
        return queue.get(timeout=3600)
    finally:
        proc.join(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--method", default="sds-")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="PGD steps (gradient methods)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-per-shard", type=int, default=16)
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-driver", action="store_true")
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/bench_pipeline_<method>.json)")
    args = p.parse_args()

    results = {"args": vars(args), "cpus": os.cpu_count(), "started_load_average": load()}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"bench_pipeline_{args.method.replace('+', 'p')}.json"
    out.parent.mkdir(exist_ok=True)

    def save() -> None:  # after every figure: a long run stopped early keeps what it measured
        out.write_text(json.dumps(results, indent=2) + "\n")

    if not args.skip_throughput:
        results["throughput"] = bench_throughput(args)
        save()
    if not args.skip_driver:
        results["driver"] = []
        for n in (4, 40):
            results["driver"].append(bench_driver(args, n))
            save()
    save()
    if "throughput" in results:
        t = results["throughput"]
        print(f"throughput ({t['images']} + {2 * t['images']} images {args.size}px, {args.model}, {args.method}, "
              f"batch {args.batch_size}, {t['device']}, load {t['load_average']}):")
        print(f"  pipeline steady {t['pipeline_steady_images_per_s']} img/s (raw {t['pipeline_raw_images_per_s']}), "
              f"protector alone {t['protector_images_per_s']} img/s, actor alone {t['actor_images_per_s']} img/s")
        print(f"  ratio pipeline/protector {t['ratio_steady_vs_protector']}, pipeline/actor {t['ratio_steady_vs_actor']}")
    for m in results.get("driver", []):
        print(f"  {m['shards']} shards ({m['images']} images, {m['input_mib']} MiB in): driver peak RSS "
              f"{m['driver_peak_rss_mib']} MiB, received {m['driver_bytes_received']} B ({m['driver_bytes_per_image']} B/image)")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
