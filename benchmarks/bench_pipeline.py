"""Pipeline throughput vs the protection actor alone, and peak memory vs the number of shards.

    python benchmarks/bench_pipeline.py                       # CPU, tiny model, small sizes
    python benchmarks/bench_pipeline.py --model sd15-arch --size 512 --steps 20 --device cuda

1. Throughput: the same images (in WebDataset shards), model, steps and batch size go
   (a) through the whole pipeline (`run_protect`: read -> validate -> actor pool -> write shards + tables),
   (b) straight into one `ProtectActor` (a Ray actor with the same resources) as ready-made batches.
   ratio = pipeline images/s / actor images/s; >= 0.9 means reading, decoding and writing hide behind
   protection. A pipeline run includes its start-up (Ray Data planning, actor start, model load) and
   the actor figure does not (model loaded before timing), so the pipeline also runs on twice the
   images: the steady-state rate is the extra images over the extra seconds, start-up cancelled.
   Both ratios are reported (raw, a lower bound; steady state, what a long job sees).
2. Memory: peak resident memory of the whole process tree (driver, raylet, workers) while protecting
   4 and 40 shards of the same size; it must not grow with the number of shards.

Writes benchmarks/results/bench_pipeline.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_shards(root: Path, shards: int, per_shard: int, size: int) -> None:
    from pipeline.sample_data import photo_samples, shard_bytes

    root.mkdir(parents=True, exist_ok=True)
    samples = photo_samples(shards * per_shard, sizes=((size, size),))
    for s in range(shards):
        (root / f"shard-{s:06d}.tar").write_bytes(shard_bytes(samples[s * per_shard : (s + 1) * per_shard]))


def settings(args, src: Path, dst: Path):
    from pipeline.protect import ProtectConfig
    from pipeline.ray_pipeline import RunSettings

    return RunSettings(input=str(src), output=str(dst), model=args.model, device=args.device,
                       batch_size=args.batch_size, progress=False,
                       config=ProtectConfig(method=args.method, steps=args.steps, eps=16, step_size=1))


def bench_throughput(args) -> dict:
    import pyarrow as pa
    import ray

    from pipeline.io import read_samples
    from pipeline.ray_pipeline import actor_options, ensure_ray, run_protect
    from pipeline.stages import ProtectActor, Validator

    with tempfile.TemporaryDirectory() as tmp:
        src, src2 = Path(tmp) / "in", Path(tmp) / "in2"
        make_shards(src, args.shards, args.per_shard, args.size)
        make_shards(src2, 2 * args.shards, args.per_shard, args.size)
        n = args.shards * args.per_shard
        ensure_ray(None)
        s = settings(args, src, Path(tmp) / "out")
        from pipeline.ray_pipeline import check_model

        check_model(s.model)
        warm = Path(tmp) / "warm"
        make_shards(warm, 1, s.batch_size, args.size)
        run_protect(settings(args, warm, Path(tmp) / "warm-out"), log=lambda m: None)  # one-time costs
        t0 = time.perf_counter()
        summary = run_protect(s, log=lambda m: None)
        pipeline_s = time.perf_counter() - t0
        assert summary.samples_written == n, summary
        t0 = time.perf_counter()
        summary = run_protect(settings(args, src2, Path(tmp) / "out2"), log=lambda m: None)
        pipeline2_s = time.perf_counter() - t0
        assert summary.samples_written == 2 * n, summary

        # the actor alone: same resources, same batches, model loaded before the clock starts
        rows = read_samples(str(src)).take_all()
        from pipeline.io import MEMBER_FIELDS  # noqa: F401  (batches carry the same columns as in the pipeline)

        table = pa.Table.from_pylist([{**r, "member_names": [], "member_data": []} for r in rows])
        batches = [Validator()(table.slice(i, s.batch_size)) for i in range(0, n, s.batch_size)]
        options, _ = actor_options(s)
        threads = options.pop("_threads", None)
        cls = ray.remote(num_cpus=options.get("num_cpus", 1), num_gpus=options.get("num_gpus", 0))(ProtectActor)
        device = "cuda" if options.get("num_gpus") else s.device
        actor = cls.remote({"model": s.model, "device": device, "dtype": s.dtype, "threads": threads,
                            "config": s.config.to_dict(), "revision": None})
        ray.get(actor.__call__.remote(batches[0]))  # warm-up (also loads the model)
        t0 = time.perf_counter()
        ray.get([actor.__call__.remote(b) for b in batches])
        actor_s = time.perf_counter() - t0
        ray.kill(actor)
    return {
        "images": n, "pipeline_seconds": round(pipeline_s, 2), "actor_seconds": round(actor_s, 2),
        "pipeline_images_per_s": round(n / pipeline_s, 3), "actor_images_per_s": round(n / actor_s, 3),
        "ratio": round(actor_s / pipeline_s, 3),
        "pipeline_2x_seconds": round(pipeline2_s, 2),
        "pipeline_steady_images_per_s": round(n / (pipeline2_s - pipeline_s), 3),
        "steady_ratio": round(actor_s / (pipeline2_s - pipeline_s), 3),
    }


def _memory_child(args, shards: int, queue) -> None:
    import psutil

    from pipeline.ray_pipeline import ensure_ray, run_protect

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        make_shards(src, shards, args.mem_per_shard, args.size)
        ensure_ray(None)
        me = psutil.Process()
        peak, done = 0, threading.Event()

        def sample():
            nonlocal peak
            import ray

            while not done.is_set():
                total = 0
                procs = [me, *me.children(recursive=True)]
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
                time.sleep(0.2)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        s = settings(args, src, Path(tmp) / "out")
        s.config.steps = args.mem_steps
        summary = run_protect(s, log=lambda m: None)
        done.set()
        t.join()
        queue.put({"shards": shards, "images": summary.samples_written, "peak_rss_mib": round(peak / 2**20)})


def bench_memory(args, shards: int) -> dict:
    ctx = mp.get_context("spawn")  # a fresh Ray per measurement
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(args, shards, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--method", default="sds-")
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--mem-per-shard", type=int, default=8)
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()

    results = {"args": vars(args), "throughput": bench_throughput(args)}
    import ray

    ray.shutdown()
    if not args.skip_memory:
        results["memory"] = [bench_memory(args, n) for n in (4, 40)]
    out = Path(__file__).parent / "results" / "bench_pipeline.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    t = results["throughput"]
    print(f"throughput ({t['images']} images {args.size}px, {args.model}, {args.steps} steps, batch {args.batch_size}):")
    print(f"  pipeline {t['pipeline_images_per_s']} img/s ({t['pipeline_seconds']} s incl. start-up), "
          f"actor alone {t['actor_images_per_s']} img/s ({t['actor_seconds']} s): ratio {t['ratio']}")
    print(f"  steady state (pipeline on {2 * t['images']} images took {t['pipeline_2x_seconds']} s): "
          f"{t['pipeline_steady_images_per_s']} img/s, ratio {t['steady_ratio']}")
    for m in results.get("memory", []):
        print(f"  {m['shards']} shards ({m['images']} images): peak RSS of the process tree {m['peak_rss_mib']} MiB")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
