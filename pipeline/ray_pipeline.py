"""`run_protect`: the one code path from INPUT to OUTPUT, on local Ray or a cluster.

    preflight (driver, before any Ray work): method, model, input listing, output bucket
    plan units (shards or chunks of files), skip the ones an earlier run committed (resume)
    read_webdataset / read_binary_files  -> Validator (CPU tasks)
      -> ProtectActor pool (map_batches, ActorPoolStrategy; 1 GPU per actor when there are GPUs)
      -> driver: rows arrive in input order (preserve_order), each unit's shard is spooled and
         committed when the next unit starts (shards.py); tables per unit; one runs row at the end

Protection dominates the cost by orders of magnitude (many forward/backward passes per image), so
writing from the driver is not the bottleneck; what matters is that reading, decoding and writing
overlap with the actors, which Ray Data's streaming executor does.
"""

from __future__ import annotations

import json
import os
import platform
import posixpath
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata

from tqdm import tqdm

from . import tables
from .images import DEFAULT_MAX_PIXELS
from .io import (
    InputError, TABLES_DIR, check_bucket, is_s3, list_images, list_shards, parse_uri, pattern_root,
    public_s3_options, read_paths, split_uri, to_uri,
)
from .protect import ALL_METHODS, ProtectConfig, check_ensemble_method
from .shards import UnitSink, committed, first_unreadable, plan_units

FAULT_ENV = "MIMICSHIELD_FAULT_AFTER_UNITS"  # tests: fail after this many units were committed


def short_error(err: BaseException) -> str:
    """The innermost 'SomethingError: reason' of an exception (Ray wraps task errors in layers)."""
    import re

    texts, seen, e = [], set(), err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(f"{type(e).__name__}: {e}")
        e = getattr(e, "cause", None) or e.__cause__
    found = [m.group(0).strip() for t in texts for m in re.finditer(r"^\s*[\w.]*(?:Error|Exception): .+$", t, re.M)]
    found = [f for f in found if not f.startswith(("ray.", "RayTaskError", "SystemException"))]
    return (found[-1] if found else texts[0].splitlines()[0])[:500]


class InjectedFault(RuntimeError):
    """Raised on purpose (FAULT_ENV) to test resuming after a crash."""


@dataclass
class RunSettings:
    input: str
    output: str
    config: ProtectConfig
    model: str = "tiny"
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 4
    low_memory: bool = False  # models.load_models(low_memory=...): less GPU memory, same result
    actors: int | None = None  # protection actors (default: one per GPU, or 1 on CPU)
    address: str | None = None  # Ray address; None: RAY_ADDRESS or a local Ray started in-process
    s3: dict = field(default_factory=dict)  # endpoint_url, region, access_key, ... (env otherwise)
    max_pixels: int = DEFAULT_MAX_PIXELS
    chunk_size: int = 256  # files per unit for folder input
    progress: bool = True


@dataclass
class RunSummary:
    run_id: str
    input: str
    output: str
    kind: str
    units_total: int
    units_skipped: int
    units_done: int
    samples_in: int
    samples_written: int
    errors: int
    seconds: float
    device: str

    @property
    def images_per_second(self) -> float:
        return self.samples_in / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        unit = "shards" if self.kind == "shards" else "chunks of files"
        out = self.output.rstrip("/")
        lines = [
            f"mimicshield protect: run {self.run_id} done in {self.seconds:.1f} s on {self.device}",
            f"  {self.samples_in} samples in, {self.samples_written} protected, {self.errors} errors "
            f"({self.images_per_second:.2f} images/s)",
            f"  {self.units_done} {unit} written, {self.units_skipped} already done (skipped), {self.units_total} in total",
            f"  protected {'shards' if self.kind == 'shards' else 'files'}: {out}/",
            f"  tables:  {out}/{TABLES_DIR}/protect_metrics/  {out}/{TABLES_DIR}/errors/  {out}/{TABLES_DIR}/runs/",
        ]
        if self.errors:
            lines.append(f"  why samples failed: {out}/{TABLES_DIR}/errors/ (columns key, source, stage, reason)")
        return "\n".join(lines)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("mimicshield", "ray", "torch", "diffusers", "transformers", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ---------------------------------------------------------------- preflight


def check_models(model: str, revision: str | None = None) -> list[str]:
    """`check_model` for each model of `A,B,...` (an ensemble); returns the model ids."""
    from .models import split_model_ids, split_revisions

    names = split_model_ids(model)
    for name, rev in zip(names, split_revisions(revision, len(names))):
        check_model(name, rev)
    return names


def check_model(model: str, revision: str | None = None) -> None:
    """Fail fast, on the driver, when `model` cannot be loaded by the actors."""
    import re

    from .builtin_models import BUILTIN_MODELS, builtin_model_path
    from .models import ModelLoadError

    if model in BUILTIN_MODELS:
        builtin_model_path(model)  # generate it once here rather than in every actor
        return
    local = os.path.expanduser(model)
    if os.path.isdir(local):
        if not os.path.exists(os.path.join(local, "model_index.json")) and not os.path.isdir(os.path.join(local, "unet")):
            raise ModelLoadError(f"{model} is a directory but not a diffusers model (no model_index.json, no unet/)")
        return
    if model.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise ModelLoadError(
            f"unknown model {model!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), not a local diffusers "
            "directory, not a hub id (owner/name)"
        )
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(model, "model_index.json", revision=revision)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelLoadError(
            f"cannot reach model {model!r} on the Hugging Face hub ({type(err).__name__}: {first}). Pass a local "
            f"diffusers directory or a built-in ({', '.join(BUILTIN_MODELS)})"
        ) from None


@dataclass
class Plan:
    kind: str
    in_fs: object
    in_root: str
    out_fs: object
    out_root: str
    units: list
    done: set


def preflight(s: RunSettings) -> Plan:
    """Everything that can make the whole run fail, checked before Ray starts working."""
    if s.config.method not in ALL_METHODS:
        raise ValueError(f"unknown method {s.config.method!r}; choose from {', '.join(ALL_METHODS)}")
    if s.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    in_fs, in_path, kind = parse_uri(s.input, s.s3)
    if kind == "shards":
        paths, root = list_shards(in_fs, in_path, s.input), pattern_root(in_path)  # a .tar path: its folder
    else:
        if in_fs.get_file_info(in_path).type.name == "NotFound":
            raise InputError(f"input not found: {s.input}")
        paths, root = list_images(in_fs, in_path, s.input), in_path
    if not paths:
        raise InputError(f"no {'shards' if kind == 'shards' else 'images'} found at {s.input}")
    out_fs, out_root = split_uri(s.output, s.s3)
    if out_root.endswith(".tar") or "{" in out_root:
        raise InputError(f"OUTPUT must be a folder or prefix, got {s.output}")
    check_bucket(out_fs, out_root, s.output)
    if type(in_fs) is type(out_fs) and posixpath.normpath(out_root) == posixpath.normpath(root):
        raise InputError("OUTPUT must differ from INPUT (protected files would replace the originals)")
    if type(in_fs) is type(out_fs) and posixpath.normpath(out_root).startswith(posixpath.normpath(root) + "/"):
        inside = posixpath.normpath(out_root) + "/"
        paths = [p for p in paths if not p.startswith(inside)]  # OUTPUT inside INPUT: never protect our own outputs
    units = plan_units(kind, paths, root, out_root, s.chunk_size)
    try:
        done = committed(out_fs, out_root, units)
    except OSError as err:
        raise InputError(f"cannot read {s.output}: {str(err).splitlines()[0]}") from None
    return Plan(kind=kind, in_fs=in_fs, in_root=root, out_fs=out_fs, out_root=out_root, units=units, done=done)


# ---------------------------------------------------------------- Ray


def ensure_ray(address: str | None):
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    return ray


def actor_options(s: RunSettings) -> tuple[dict, str]:
    """(map_batches options for the protection stage, device description)."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 1)
    want_gpu = s.device.startswith("cuda") or (s.device == "auto" and gpus > 0)
    if want_gpu:
        size = s.actors or max(gpus, 1)
        compute = ray.data.ActorPoolStrategy(min_size=1, max_size=size)
        return {"compute": compute, "num_gpus": 1, "num_cpus": 1}, f"{size} GPU actor(s)"
    size = s.actors or 1
    per_actor = max(0.5, (cpus - 1) / size)  # leave a core for reading, decoding and writing
    compute = ray.data.ActorPoolStrategy(size=size)
    return {"compute": compute, "num_cpus": per_actor, "_threads": max(1, int(per_actor))}, f"{size} CPU actor(s)"


def build_dataset(s: RunSettings, plan: Plan, pending: list):
    import ray

    from .stages import ProtectActor, Validator

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in input order: units commit one by one
    ctx.enable_progress_bars = s.progress
    paths = [p for unit in pending for p in unit.inputs]
    ds = read_paths(plan.in_fs, paths, plan.kind, root=plan.in_root, with_members=True)
    # decoding runs in CPU tasks of their own. Each reserves the memory a largest allowed image needs
    # (RGB + a working copy), which also keeps Ray from fusing this stage into the protection actors
    # (it fuses task -> actor stages with equal resources): decoding stays off the actors' critical path
    ds = ds.map_batches(Validator(s.max_pixels), batch_format="pyarrow", batch_size=s.batch_size * 4,
                        num_cpus=1, memory=max(256 * 2**20, 6 * s.max_pixels))
    options, device = actor_options(s)
    threads = options.pop("_threads", None)
    device_name = "cuda" if (s.device == "auto" and "num_gpus" in options) else s.device
    settings = {
        "model": s.model, "revision": s.revision, "device": device_name,
        "dtype": s.dtype, "low_memory": s.low_memory, "threads": threads, "max_pixels": s.max_pixels, "config": s.config.to_dict(),
    }
    ds = ds.map_batches(ProtectActor, fn_constructor_args=(settings,), batch_format="pyarrow",
                        batch_size=s.batch_size, **options)
    return ds, device


# ---------------------------------------------------------------- the run


def run_protect(s: RunSettings, log=print) -> RunSummary:
    """Protect everything under `s.input` into `s.output`; returns the summary (see module doc)."""
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    run_id = started.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    s.config = ProtectConfig(**s.config.to_dict())  # validates
    plan = preflight(s)
    models = check_models(s.model, s.revision)  # ["A", "B"] for --model A,B (an ensemble)
    check_ensemble_method(s.config.method, len(models))
    pending = [u for u in plan.units if u.id not in plan.done]
    if plan.done:
        log(f"resuming: {len(plan.done)} of {len(plan.units)} units already done in {s.output}, skipping them")
    run = {"run_id": run_id, "method": s.config.method, "eps": s.config.eps, "step_size": s.config.step_size,
           "steps": s.config.steps, "model": s.model, "model_revision": s.revision}
    meta_params = {"method": s.config.method, "eps": s.config.eps, "step_size": s.config.step_size,
                   "steps": s.config.steps, "init": s.config.init, "seed": s.config.seed,
                   "resolution": s.config.resolution, "model": s.model, "model_revision": s.revision,
                   "models": models, "version": versions()["mimicshield"], "run_id": run_id}
    counts = {"units_done": 0, "samples_in": 0, "samples_written": 0, "errors": 0}
    device, failure, position = "-", None, 0
    fault_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    try:
        if pending:
            ray = ensure_ray(s.address)
            ds, device = build_dataset(s, plan, pending)
            source_unit = {}
            for unit in pending:
                for p in unit.inputs:
                    source_unit[to_uri(plan.in_fs, p)] = unit
            order = {u.id: i for i, u in enumerate(pending)}
            with tempfile.TemporaryDirectory(prefix="mimicshield-spool-") as tmpdir:
                sink = UnitSink(plan.kind, plan.out_fs, plan.out_root, run, meta_params, tmpdir=tmpdir)
                bar = tqdm(total=len(pending), unit="shard" if plan.kind == "shards" else "chunk",
                           desc="committed", disable=not s.progress, file=sys.stderr)
                position = -1  # index in `pending` of the unit being received

                def commit_through(last: int) -> None:
                    nonlocal position
                    while position < last:
                        if sink.unit is not None:
                            c = sink.commit()
                            counts["units_done"] += 1
                            counts["samples_in"] += c.samples
                            counts["samples_written"] += c.written
                            counts["errors"] += c.errors
                            bar.update(1)
                            bar.set_postfix(samples=counts["samples_in"], errors=counts["errors"])
                            if fault_after and counts["units_done"] >= fault_after:
                                raise InjectedFault(f"{FAULT_ENV}={fault_after}: stopping after {fault_after} units")
                        position += 1
                        if position < len(pending):
                            sink.begin(pending[position])

                batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
                try:
                    for batch in batches:
                        for row in batch.to_pylist():
                            unit = source_unit[row["source"]]
                            idx = order[unit.id]
                            if idx < position:
                                raise RuntimeError(f"internal: sample {row['key']} of {unit.id} arrived after its unit was committed")
                            if idx > position:
                                commit_through(idx)
                            sink.add(row)
                    commit_through(len(pending))  # the last unit, and trailing empty ones
                except BaseException:
                    sink.abort()
                    raise
                finally:
                    bar.close()
                    if hasattr(batches, "close"):
                        batches.close()  # stops the streaming executor and its actors now, not at GC
            del ray
    except BaseException as err:
        failure = short_error(err)
        if plan.kind == "shards" and "ReadError" in failure and pending:
            done_ids = set(plan.done)
            left = [u for u in pending[max(position, 0):] if u.id not in done_ids]
            bad = first_unreadable(plan.in_fs, left)
            if bad:
                failure = f"cannot read shard {bad} ({failure}); remove or repair it and rerun to resume"
                raise InputError(failure) from err
        raise
    finally:
        seconds = time.perf_counter() - t0
        _write_run_row(s, plan, run_id, started, seconds, counts, failure)
    return RunSummary(run_id=run_id, input=s.input, output=s.output, kind=plan.kind, units_total=len(plan.units),
                      units_skipped=len(plan.done), seconds=seconds, device=device, **counts)


def _write_run_row(s: RunSettings, plan: Plan, run_id: str, started, seconds: float, counts: dict, failure) -> None:
    config = {
        "protect": s.config.to_dict(), "model": s.model, "models": s.model.split(","), "revision": s.revision, "device": s.device, "dtype": s.dtype,
        "batch_size": s.batch_size, "low_memory": s.low_memory, "actors": s.actors, "max_pixels": s.max_pixels, "chunk_size": s.chunk_size,
        "s3": public_s3_options(s.s3) if (is_s3(s.input) or is_s3(s.output)) else None,
    }
    row = {
        "run_id": run_id, "status": "failed" if failure else "completed", "input": s.input, "output": s.output,
        "kind": plan.kind, "config": json.dumps(config, sort_keys=True), "versions": json.dumps(versions(), sort_keys=True),
        "model": s.model, "model_revision": s.revision, "method": s.config.method,
        "units_total": len(plan.units), "units_skipped": len(plan.done), **counts,
        "started_at": started, "finished_at": datetime.now(timezone.utc), "seconds": seconds,
        "images_per_second": counts["samples_in"] / seconds if seconds > 0 else 0.0,
        "failure": failure,
    }
    try:
        tables.write_table([row], "runs", posixpath.join(plan.out_root, TABLES_DIR, "runs"), plan.out_fs, basename=run_id)
    except Exception as err:  # never hide the run's own failure behind this one
        print(f"mimicshield: could not write the runs table: {err}", file=sys.stderr)
