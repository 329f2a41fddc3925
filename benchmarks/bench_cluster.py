"""A multi-node run simulated on one machine: outputs are written from worker nodes, commits stay ordered.

    python -m benchmarks.bench_cluster                  # head (driver only) + 2 worker nodes, tiny model

`ray.cluster_utils.Cluster` starts a head node with no CPUs (it only hosts the driver, like a
cluster's head that owns the job) and two worker "nodes" with 2 CPUs each (one protection actor
and one CPU task each), all on this machine.
The run then:

1. protects --shards shards and stops on purpose after the first committed unit
   (MIMICSHIELD_FAULT=units-committed:1, the same crash the resume test uses);
2. reruns the same command: it must skip the committed unit and do the rest;
3. checks: every sample was written (parts and shards) from a worker node, never the head; every
   shard holds exactly its input keys, once; protect_metrics has each key once; the driver received
   only small rows (bytes per image).

Writes benchmarks/results/bench_cluster.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MIMICSHIELD_CACHE", str(ROOT / ".cache" / "mimicshield"))
# Cluster() records its address in $RAY_TMPDIR/ray/ray_current_cluster, where any plain ray.init() on
# this machine would then connect: keep the simulated cluster in a private temp dir of its own
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rc-", dir="/tmp"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=6)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.batch.driver import run_protect
    from pipeline.batch.settings import RunSettings
    from pipeline.cluster.faults import FAULT_ENV, InjectedFault
    from pipeline.io.sample_data import photo_samples, shard_bytes
    from pipeline.models.loading import ModelSpec
    from pipeline.protect import ProtectConfig

    ModelSpec("tiny").check()  # build the tiny model once, before any node starts
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.workers):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    head_id = ray.get_runtime_context().get_node_id()
    nodes = {n["NodeID"]: ("head" if n["NodeID"] == head_id else "worker") for n in ray.nodes() if n["Alive"]}
    result = {"nodes": {k[:12]: v for k, v in nodes.items()}, "load_average_start": round(os.getloadavg()[0], 2)}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in", Path(tmp) / "out"
            src.mkdir()
            keys = {}
            for i in range(args.shards):
                samples = photo_samples(args.per_shard, sizes=((64, 64),), prefix=f"s{i}-")
                (src / f"shard-{i:06d}.tar").write_bytes(shard_bytes(samples))
                keys[f"shard-{i:06d}.tar"] = [s["__key__"] for s in samples]
            s = RunSettings(input=str(src), output=str(dst), model=ModelSpec("tiny", device="cpu"), actors=args.workers,
                            config=ProtectConfig(steps=args.steps, eps=8, step_size=2), progress=False)
            t0 = time.perf_counter()
            os.environ[FAULT_ENV] = "units-committed:1"
            try:
                run_protect(s, log=lambda m: None)
                raise SystemExit("the injected fault did not fire")
            except InjectedFault:
                pass
            finally:
                os.environ.pop(FAULT_ENV)
            committed_first = sorted(p.name for p in dst.glob("*.tar"))
            summary = run_protect(s, log=lambda m: None)
            seconds = time.perf_counter() - t0

            def by_role(counts: dict) -> dict:
                roles: dict = {}
                for node, n in counts.items():
                    roles[nodes.get(node, "?")] = roles.get(nodes.get(node, "?"), 0) + n
                return roles

            shards_ok = all(
                [m.name[: -len(".png")] for m in tarfile.open(dst / name).getmembers() if m.name.endswith(".png")] == want
                for name, want in keys.items()
            )
            metric_keys = [r["key"] for f in sorted((dst / "tables" / "protect_metrics").glob("*.parquet"))
                           for r in pq.read_table(f).to_pylist()]
            all_keys = [k for v in keys.values() for k in v]
            result.update({
                "after_fault": {"shards_present": committed_first},
                "resumed": {"units_skipped": summary.units_skipped, "units_done": summary.units_done,
                            "samples_in": summary.samples_in, "errors": summary.errors},
                "samples_written_by": by_role(summary.writer_nodes),
                "shards_assembled_by": by_role(summary.assembler_nodes),
                "writer_nodes": {k[:12]: v for k, v in summary.writer_nodes.items()},
                "driver_bytes_received": summary.driver_bytes,
                "driver_bytes_per_image": round(summary.driver_bytes / max(summary.samples_in, 1), 1),
                "every_shard_has_its_keys_once_in_order": shards_ok,
                "metric_rows_each_key_once": sorted(metric_keys) == sorted(all_keys),
                "staging_left": sorted(str(p.relative_to(dst)) for p in (dst / "tables" / "_parts").rglob("*.tar")),
                "seconds_total": round(seconds, 1),
                "load_average_end": round(os.getloadavg()[0], 2),
            })
            ok = (shards_ok and result["metric_rows_each_key_once"] and "head" not in result["samples_written_by"]
                  and "head" not in result["shards_assembled_by"] and committed_first == ["shard-000000.tar"]
                  and summary.units_skipped == 1 and not result["staging_left"])
            result["ok"] = ok
            out = ROOT / "benchmarks" / "results" / "bench_cluster.json"
            out.write_text(json.dumps(result, indent=2) + "\n")  # before the (slow) shutdown
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(result, indent=2))
    print(f"written to {out}")
    if not result.get("ok"):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
