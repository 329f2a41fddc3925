"""What reading a shard whole costs: `webdataset.read_shard` (index checked through to the end, members
grouped, every member sniffed for image content, strict JSON) vs a bare `tarfile` stream, per format.

    python -m benchmarks.bench_read_shard --samples 500 --size 256

Builds one shard of --samples samples (a PNG of --size x --size, a JSON, a .txt, a .pkl-like blob) as
.tar and as .tar.gz in a temporary folder, reads each --repeats times, and writes
benchmarks/results/bench_read_shard.json (median seconds, MB/s, samples/s, the machine's load).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pyarrow import fs as pafs

from pipeline.io.sample_data import shard_bytes
from pipeline.io.webdataset import read_shard

RESULTS = Path(__file__).resolve().parent / "results" / "bench_read_shard.json"


def build(samples: int, size: int) -> bytes:
    rng = np.random.default_rng(0)
    out = []
    for i in range(samples):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=1)
        out.append({"__key__": f"s{i:06d}", "png": buf.getvalue(), "json": json.dumps({"caption": f"c{i}"}).encode(),
                    "txt": b"a caption", "pkl": rng.bytes(512)})
    return shard_bytes(out)


def bare_stream(path: str) -> int:
    n = 0
    with tarfile.open(path, "r|*") as tar:
        for m in tar:
            if m.isfile():
                n += len(tar.extractfile(m).read())
    return n


def timed(fn, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    local = pafs.LocalFileSystem()
    data = build(args.samples, args.size)
    results = {"samples": args.samples, "size": args.size, "shard_mb": len(data) / 2**20,
               "load_average": os.getloadavg(), "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"tar": os.path.join(tmp, "s.tar"), "tar.gz": os.path.join(tmp, "s.tar.gz")}
        Path(paths["tar"]).write_bytes(data)
        Path(paths["tar.gz"]).write_bytes(gzip.compress(data, compresslevel=1))
        for fmt, path in paths.items():
            ours = timed(lambda: sum(1 for _ in read_shard(local, path)), args.repeats)
            bare = timed(lambda: bare_stream(path), args.repeats)
            results["formats"][fmt] = {
                "read_shard_s": ours, "tarfile_stream_s": bare, "overhead": ours / bare,
                "read_shard_mb_per_s": len(data) / 2**20 / ours, "read_shard_samples_per_s": args.samples / ours,
            }
            print(f"{fmt:7s} read_shard {ours:.3f} s ({len(data) / 2**20 / ours:.0f} MB/s, "
                  f"{args.samples / ours:.0f} samples/s)  bare tarfile stream {bare:.3f} s  x{ours / bare:.2f}")
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
