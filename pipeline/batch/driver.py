"""`run_protect(RunSettings) -> RunSummary`: the one code path from INPUT to OUTPUT, on local Ray or a cluster.

    RunSettings(input, output, config=ProtectConfig(...), model=ModelSpec(...), ...)   validated when built
    preflight (driver, before any Ray work): model, input listing, output bucket, units, resume
    read tasks (webdataset.ShardReader / FileReader: a shard read whole, else one failure row) -> Decoder
      -> ProtectActor pool (map_batches, ActorPoolStrategy; 1 GPU per actor when there are GPUs):
         pixels in, perturbations out, nothing else
      -> Encoder + Writer (CPU tasks): encode, measure, write files / shard parts from the worker
      -> driver: small per-sample rows in input order; each unit is committed (commit.commit_unit:
         output assembled by a worker task, tables, marker) as soon as the next unit's rows arrive

The driver never holds image bytes: its memory and traffic grow with the number of samples (one
small row each), not with their size, so one head node can drive many GPU nodes. Rows must arrive
in input order (`preserve_order`) for the driver to know when a unit is complete; outputs are small,
so the ordering costs a little buffering, not throughput.

A group method (``aspl``) protects a group's images together: the protection stage is then
``groupby("group").map_groups(ProtectActor)`` with the same actor pool, one actor task per group (the group's
rows whole in one batch; io/metadata.protection_group names the group: ``--group-by``, else the JSON
``group``/``artist`` field, else the sample alone). Groups cross units, so rows come back grouped, not in input
order: the driver holds the small result rows of the run (no image bytes) and commits units in input order
after the last group; a shard's samples are written part by part. Resume is per unit as always: a rerun
protects the samples of the units not yet committed, so a group split by an interruption is protected again
from those samples only.
"""

from __future__ import annotations

import json
import os
import platform
import posixpath
import sys
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata

from pipeline.batch.commit import (
    UnitIndex,
    UnitResult,
    clear_parts,
    commit_failed_unit,
    commit_unit,
    committed,
    input_identity,
    plan_units,
    read_markers,
    settings_diff,
)
from pipeline.batch.estimate import cost_warning
from pipeline.batch.progress import ImageProgress
from pipeline.batch.records import RunRecord
from pipeline.batch.settings import RunSettings
from pipeline.batch.stages import Decoder, Encoder, ProtectActor, Writer, assemble_task
from pipeline.cluster.faults import FAULT_ENV, fault_point
from pipeline.cluster.logs import quiet_data_context
from pipeline.cluster.pool import ActorShare, actor_share, live_nodes, no_longer_fits
from pipeline.cluster.session import ensure_ray, short_error
from pipeline.cluster.watchdog import Stalled, Watchdog
from pipeline.io import tables
from pipeline.io.files import remove_stale_temps
from pipeline.io.paths import PathArg, StorageError, check_paths, storage_problem
from pipeline.io.samples import read_paths
from pipeline.io.storage import (
    TABLES_DIR,
    InputError,
    Links,
    check_bucket,
    image_infos,
    is_s3,
    parse_uri,
    pattern_root,
    shard_infos,
    split_uri,
    to_uri,
)
from pipeline.models.devices import check_local_device
from pipeline.models.loading import ModelSpec
from pipeline.protect.encoded import jpeg_kept_share


class BadShard(InputError):
    """--on-bad-shard fail: a shard that cannot be read whole stopped the run. str() names it and why."""


BAD_SHARDS_EXIT = 3  # exit code: some input shard could not be read (skip: every other one is written)


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
    driver_bytes: int = 0  # Arrow bytes of the result rows the driver received (no image bytes)
    writer_nodes: dict = field(default_factory=dict)  # Ray node id -> samples written from it
    assembler_nodes: dict = field(default_factory=dict)  # Ray node id -> shards assembled on it
    shards_failed: int = 0  # shards that could not be read whole (errors rows, stage read; retried on rerun)
    notes: list = field(default_factory=list)  # warnings and error reasons, grouped with counts

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
        if self.shards_failed:
            lines.append(f"  {self.shards_failed} shard(s) could not be read and were skipped; fix them and rerun "
                         f"the same command to process only those (exit code {BAD_SHARDS_EXIT})")
        lines += [f"  {note}" for note in self.notes]
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


def check_model(model: str, revision: str | None = None) -> None:
    """Fail fast, on the driver, when `model` cannot be loaded (`ModelSpec.check`)."""
    ModelSpec(model, revision=revision).check()


@dataclass
class Plan:
    kind: str
    in_fs: object
    in_root: str
    out_fs: object
    out_root: str
    units: list
    done: set
    links: Links = field(default_factory=Links)  # symbolic links the folder listing did not follow


def preflight(s: RunSettings, fingerprint: dict | None = None) -> Plan:
    """Everything that can make the whole run fail, checked before Ray starts working.

    (Method, budget, dtype and the other options were validated when the settings were built.)
    `fingerprint`: the settings' fingerprint for the hardware the run gets (default: this machine's).
    """
    in_fs, in_path, kind = parse_uri(s.input, s.s3)
    links = Links(follow_external=s.follow_external_links)
    if kind == "shards":
        infos, root = shard_infos(in_fs, in_path, s.input, links), pattern_root(in_path)  # a .tar path: its folder
        paths, identity = [i.path for i in infos], {i.path: input_identity(i) for i in infos}
    else:
        if in_fs.get_file_info(in_path).type.name == "NotFound":
            raise InputError(f"input not found: {s.input}")
        infos, root = image_infos(in_fs, in_path, s.input, links), in_path
        paths, identity = [i.path for i in infos], {i.path: input_identity(i) for i in infos}
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
    for unit in units:
        unit.identity = [identity.get(p, "") for p in unit.inputs]
    try:
        markers = read_markers(out_fs, out_root, units)
    except OSError as err:
        raise InputError(f"cannot read {s.output}: {str(err).splitlines()[0]}") from None
    done = set() if s.overwrite else committed(out_fs, out_root, units, markers)
    if not s.overwrite:
        check_same_settings(markers, fingerprint or s.fingerprint(), s.output)
    return Plan(kind=kind, in_fs=in_fs, in_root=root, out_fs=out_fs, out_root=out_root, units=units, done=done,
                links=links)


def check_same_settings(markers: dict, current: dict, output: str) -> None:
    """Refuse to resume into an OUTPUT whose units were written with other settings (one message)."""
    for marker in markers.values():
        diff = settings_diff(marker.get("settings"), current)
        if diff:
            raise InputError(f"{output} holds {len(markers)} unit(s) written with other settings ({'; '.join(diff)}); "
                             "rerun with the same options to resume, use another OUTPUT, or add --overwrite to "
                             "reprocess everything")


# ---------------------------------------------------------------- Ray


def task_memory(s: RunSettings) -> int:
    """What a CPU stage task reserves: a worker's own memory (torch, codecs: about 0.5 GiB) plus the largest
    image it may hold (decoded RGB, its float copy and the encoder's buffers: about 6 bytes a pixel)."""
    return 512 * 2**20 + 6 * s.max_pixels


def actor_options(s: RunSettings) -> tuple[dict, str]:
    """(map_batches options for the protection stage, device description): cluster/pool.py's rule."""
    share = actor_share(s.model.device, s.actors, task_memory=task_memory(s))
    return {**share.pool_options(), "_threads": share.threads}, share.describe()


def build_dataset(s: RunSettings, plan: Plan, pending: list, run: RunRecord, share: ActorShare):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in input order: units commit one by one
    quiet_data_context(ctx, s.verbose, s.progress)
    paths = [p for unit in pending for p in unit.inputs]
    ds = read_paths(plan.in_fs, paths, plan.kind, root=plan.in_root, with_members=True)
    # CPU stages reserve a worker's own memory (torch, codecs: about 0.5 GiB) plus what a largest allowed
    # image needs (pixels + working copies); this also keeps Ray from fusing the decode tasks into the
    # protection actors (it fuses task -> actor stages with equal resources): decoding stays off the
    # actors' critical path
    cpu = {"batch_format": "pyarrow", "batch_size": s.cpu_batch_size(), "num_cpus": 1, "memory": task_memory(s)}
    ds = ds.map_batches(Decoder(UnitIndex(plan.kind, pending), s.max_pixels, s.group_by), **cpu)
    spec = s.model.on("cuda") if (s.model.device == "auto" and share.gpu) else s.model
    actor = {"fn_constructor_kwargs": {"model": spec, "config": s.config, "threads": share.threads,
                                       "max_memory_gb": s.max_memory_gb}, "batch_format": "pyarrow"}
    if s.grouped:  # aspl: one actor task per group, the group whole (rows come back grouped: the driver reorders)
        ds = ds.groupby("group").map_groups(ProtectActor, **actor, **share.pool_options())
    else:
        ds = ds.map_batches(ProtectActor, batch_size=s.batch_size, **actor, **share.pool_options())
    ds = ds.map_batches(Encoder(s.config.eps, s.max_pixels, s.config.fastprotect.lpips_weights, s.jpeg_as, s.png_level), **cpu)
    writer = Writer(plan.kind, plan.out_fs, plan.out_root, {u.id: u.output for u in pending}, run.sample_params(),
                    run.run_id, plan.in_root, fault=os.environ.get(FAULT_ENV))
    ds = ds.map_batches(writer, **cpu)  # same resources as the Encoder: fused into the same tasks
    return ds, share.describe()


def remote_assembler(nodes: list | None = None):
    """An `assemble(out_fs, result)` for `commit_unit` that runs in a worker task, not here.

    The task goes to the node that wrote the unit's parts (a worker node, by construction; soft:
    anywhere if that node is gone), never needs a CPU of its own (pure I/O) and is retried.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=2)(assemble_task)

    def assemble(out_fs, result: UnitResult):
        where = NodeAffinitySchedulingStrategy(result.node, soft=True) if result.node else "SPREAD"
        size, node = ray.get(task.options(scheduling_strategy=where).remote(out_fs, result.parts, result.unit.output))
        if nodes is not None:
            nodes.append(node)
        return size

    return assemble


# ---------------------------------------------------------------- the run


@dataclass
class _Receiver:
    """Driver side: gathers each unit's small rows and commits units in order."""

    plan: Plan
    run: RunRecord
    pending: list
    assemble: object
    progress: bool = True
    settings: object = None  # RunSettings (bad-shard policy)
    fingerprint: dict | None = None  # written into each marker
    log: object = print

    def __post_init__(self):
        self.order = {u.id: i for i, u in enumerate(self.pending)}
        self.position = 0  # index in `pending` of the next unit to commit
        self.open: dict[str, UnitResult] = {}
        self.failed: dict[str, str] = {}  # unit id -> why its shard could not be read
        self.counts = no_counts()
        self.warnings: Counter = Counter()  # warning text -> samples
        self.over_budget: list[float] = []  # written L-inf of outputs above the budget (lossy formats)
        self.jpeg_kept: list[float] = []  # share of the perturbation each JPEG output kept (protect/encoded.JPEG_KEPT)
        self.reasons: Counter = Counter()  # error reason -> samples
        self.writer_nodes: dict[str, int] = {}
        images = None if self.plan.kind == "shards" else sum(len(u.inputs) for u in self.pending)
        self.bar = ImageProgress(images, len(self.pending), "shards" if self.plan.kind == "shards" else "chunks",
                                 enabled=self.progress)

    def add(self, row: dict) -> None:
        idx = self.order[row["unit"]]
        if idx < self.position:
            raise RuntimeError(f"internal: sample {row['key']} of {row['unit']} arrived after its unit was committed")
        self.commit_through(idx)  # rows arrive in input order: every unit before this one is complete
        res = self.open.setdefault(row["unit"], UnitResult(self.pending[idx]))
        if row["key"] is None:  # the reader could not read this shard whole: what came before it is dropped
            self.failed[row["unit"]] = row["reason"] or "unreadable"
            return
        res.counts.samples += 1
        self.bar.sample(error=bool(row["stage"]))
        if row["stage"]:
            self.reasons[row["reason"] or "unknown"] += 1
            res.counts.errors += 1
            res.errors.append({"key": row["key"], "source": row["source"], "stage": row["stage"],
                               "reason": row["reason"] or "unknown", "run_id": self.run.run_id})
            return
        res.counts.written += 1
        if res.counts.written == 1:
            fault_point("mid-unit", res.unit.id)  # tests: the workers wrote part of this unit
        self.writer_nodes[row["node"]] = self.writer_nodes.get(row["node"], 0) + 1
        if row["part"] and (not res.parts or res.parts[-1] != row["part"]):
            res.parts.append(row["part"])
            res.node = row["node"]
        measured = {k: row[k] for k in ("width", "height", "linf", "psnr", "ssim", "lpips", "seconds", "device",
                                        "warnings")}
        res.metrics.append(self.run.metric_row(row["key"], row["source"], row["output"], row["format"], measured))
        self.note(measured)
        for more in json.loads(row["more_metrics"]) if row.get("more_metrics") else []:  # other image members
            fmt = more.pop("format")
            extra = {**measured, **more}
            res.metrics.append(self.run.metric_row(row["key"], row["source"], row["output"], fmt, extra))
            self.note(extra)

    def input_order(self, row: dict) -> tuple:
        """A grouped run's row order: by unit in input order, then staging part (a shard's parts stay whole),
        then key (a bad shard's row, key null, first in its unit)."""
        return self.order[row["unit"]], row["part"] or "", row["key"] is not None, row["key"] or ""

    def note(self, measured: dict) -> None:
        for warning in (measured.get("warnings") or "").split("; "):  # as the Encoder joins them
            kept = jpeg_kept_share(warning)
            if "exceeds the budget" in warning:
                self.over_budget.append(measured["linf"])
            elif kept is not None:
                self.jpeg_kept.append(kept)
            elif warning:
                self.warnings[warning] += 1

    def notes(self, eps: float) -> list[str]:
        return summary_notes(self.warnings, self.over_budget, self.reasons, eps, jpeg_kept=self.jpeg_kept)

    def commit_through(self, last: int) -> None:
        """Commit pending[position:last] (units with no rows at all are committed empty)."""
        while self.position < last:
            unit = self.pending[self.position]
            result = self.open.pop(unit.id, None) or UnitResult(unit)
            if unit.id in self.failed:
                self.commit_failed(result, self.failed[unit.id])
                self.position += 1
                continue
            c = commit_unit(self.plan.out_fs, self.plan.out_root, self.plan.kind, result, self.run.run_id,
                            assemble=self.assemble, settings=self.fingerprint)
            self.position += 1
            self.counts["units_done"] += 1
            self.counts["samples_in"] += c.samples
            self.counts["samples_written"] += c.written
            self.counts["errors"] += c.errors
            self.bar.unit_done()
            fault_point("units-committed", self.counts["units_done"])  # tests: crash after N units

    def commit_failed(self, result: UnitResult, reason: str) -> None:
        """A shard that could not be read whole: one errors row (stage read, empty key), no output, no
        marker (a rerun retries it); the samples read before the failure are dropped with their parts."""
        failed = UnitResult(result.unit, errors=[{"key": "", "source": self.plan_uri(result.unit.inputs[0]), "stage": "read",
                                                  "reason": reason, "run_id": self.run.run_id}])
        commit_failed_unit(self.plan.out_fs, self.plan.out_root, failed)
        self.counts["shards_failed"] += 1
        self.log(f"mimicshield: {reason}")
        if self.settings is not None and self.settings.on_bad_shard == "fail":
            raise BadShard(f"{reason} (--on-bad-shard fail: stopped; shards before it are kept)")

    def plan_uri(self, path: str) -> str:
        return to_uri(self.plan.in_fs, path)


def summary_notes(warnings: Counter, over_budget: list[float], reasons: Counter, eps: float, first: int = 3,
                  jpeg_kept: list[float] = ()) -> list[str]:
    """The terminal's summary of warnings and error reasons, grouped with counts (most frequent first)."""
    out = []
    if jpeg_kept:  # one line for all JPEG outputs, not one per percentage
        out.append(f"{len(jpeg_kept)} JPEG output(s) within the budget keep {sum(jpeg_kept) / len(jpeg_kept):.0%} of their perturbation "
                   f"on average (least {min(jpeg_kept):.0%}) through their own quantisation; --jpeg-as png keeps all of it")
    if over_budget:
        out.append(f"{len(over_budget)} JPEG output(s) exceed the budget after compression: max L-inf "
                   f"{max(over_budget):g} > {eps:g} (--jpeg-as png keeps it exact)")
    out += [f"{n} sample(s): {text}" for text, n in warnings.most_common()]
    out += [f"{n} error(s): {reason}" for reason, n in reasons.most_common(first)]
    if len(reasons) > first:
        out.append(f"... and {len(reasons) - first} other error reason(s) (see the errors table)")
    return out


def run_protect(s: RunSettings, log=print) -> RunSummary:
    """Protect everything under `s.input` into `s.output`; returns the summary (see module doc)."""
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    run = RunRecord(run_id=started.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6], config=s.config,
                    model=s.model, version=versions()["mimicshield"])
    # 1. preflight, before Ray: every path, and the device when the actors run on this machine
    address = s.address or os.environ.get("RAY_ADDRESS")  # a cluster's; None: a local Ray (step 4)
    check_paths([PathArg("INPUT", s.input)], PathArg("OUTPUT", s.output), s.s3, inside_ok=True)
    if not address:
        check_local_device(s.model.device)  # --device cuda without a GPU here: say so before Ray starts
    # 2. the actors' hardware, which sets the device and dtype in the settings' fingerprint: a cluster's GPUs
    #    (the cluster is joined here), else this machine's (no Ray needed yet)
    cluster = ensure_ray(address, s.verbose) if address else None
    fingerprint = s.fingerprint(int(cluster.cluster_resources().get("GPU", 0)) if cluster else None)
    # 3. the plan: units, those already done (a resume only with the same settings), every model loadable
    plan = preflight(s, fingerprint)
    s.model.check()  # every model of an ensemble (--model A,B)
    pending = [u for u in plan.units if u.id not in plan.done]
    # 4. the actor pool, on the live Ray (a local Ray starts here, and only when there is work: Ray is
    #    joined or started once per run): a pool that cannot run beside its tasks is refused here
    share = None
    if pending:
        if cluster is None:
            ensure_ray(None, s.verbose)
        share = pool_share(s, log)
    # 5. before the work: what the run will cost and skip, and the temporary files of a killed run removed
    announce(s, plan, pending, log)
    remove_stale_temps(plan.out_fs, plan.out_root)  # left by a run that was killed or ran out of space
    # 6. protect the pending units, each committed in input order once whole; the run's row is written
    #    whatever happens, naming its failure (`run_failure`: the one place errors are mapped)
    receiver, device, driver_bytes, assembled_on = None, "-", 0, []
    failure, storage_failed = None, False
    # ends a stalled run (--stall-timeout, by default from the run's own pace) and one a lost node leaves unplaceable
    replan = (lambda: no_longer_fits(share, live_nodes(), task_memory(s))) if share is not None else None
    watchdog = Watchdog(s.stall_timeout, log=log, replan=replan)
    try:
        if pending:
            if plan.kind == "shards":
                clear_parts(plan.out_fs, plan.out_root, {u.id for u in pending})  # left by an interrupted run
            ds, device = build_dataset(s, plan, pending, run, share)
            receiver = _Receiver(plan, run, pending, remote_assembler(assembled_on), s.progress,
                                 settings=s, fingerprint=fingerprint, log=log)
            driver_bytes = receive(ds, receiver, s.grouped, watchdog)
    except BaseException as err:
        failure, raised = run_failure(err, watchdog, s.output)
        storage_failed = isinstance(raised, StorageError)  # its one line says so: the runs row stays quiet
        if raised is err:
            raise
        raise raised from None
    finally:
        seconds = time.perf_counter() - t0
        counts = receiver.counts if receiver else no_counts()
        _write_run_row(s, plan, run, started, seconds, counts, failure, quiet=storage_failed)
    # 7. the summary
    return RunSummary(run_id=run.run_id, input=s.input, output=s.output, kind=plan.kind, units_total=len(plan.units),
                      units_skipped=len(plan.done), seconds=seconds, device=device, driver_bytes=driver_bytes,
                      writer_nodes=dict(receiver.writer_nodes) if receiver else {},
                      assembler_nodes={n: assembled_on.count(n) for n in set(assembled_on)},
                      notes=[*([plan.links.summary()] if plan.links.summary() else []),
                             *(receiver.notes(s.config.eps) if receiver else [])], **counts)


def no_counts() -> dict:
    """A run's counts before any unit is committed (the runs table's columns)."""
    return {"units_done": 0, "samples_in": 0, "samples_written": 0, "errors": 0, "shards_failed": 0}


def pool_share(s: RunSettings, log=print) -> ActorShare:
    """The protection actors' share of the live Ray cluster (cluster/pool.py's rule; its note logged)."""
    share = actor_share(s.model.device, s.actors, task_memory=task_memory(s))
    if share.note:
        log(f"mimicshield: {share.note}")
    return share


def announce(s: RunSettings, plan: Plan, pending: list, log=print) -> None:
    """What a run says before it works: a long local run says so (batch/estimate.py); a resume, what it skips."""
    warning = cost_warning(s, plan.kind, pending)
    if warning:
        log(warning)
    if plan.done:
        log(f"resuming: {len(plan.done)} of {len(plan.units)} units already done in {s.output}, skipping them")


def receive(ds, receiver: _Receiver, grouped: bool, watchdog: Watchdog) -> int:
    """Stream the result rows of `ds` into `receiver` in input order, then commit the last units; returns the
    Arrow bytes the driver received.

    A run by samples gets its rows in input order (`preserve_order`) and hands each on as it comes, so units
    commit one by one. A grouped run (aspl) gets them grouped, and a group may end in any unit: it holds
    every row (small, no image bytes) and hands them on in input order after the last one. The watchdog
    sees each row; the progress bar and the stream are closed on the way out, whatever happens.
    """
    batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
    driver_bytes, held = 0, []
    with ExitStack() as on_exit:  # last in, first out: the bar closes, then the stream
        if hasattr(batches, "close"):
            on_exit.callback(batches.close)  # stops the streaming executor and its actors now, not at GC
        on_exit.callback(receiver.bar.close)
        with watchdog:
            for batch in batches:
                driver_bytes += batch.nbytes
                for row in batch.to_pylist():
                    if grouped:
                        held.append(row)
                    else:
                        receiver.add(row)
                    watchdog.tick()
            for row in sorted(held, key=receiver.input_order):
                receiver.add(row)
        receiver.commit_through(len(receiver.pending))  # the last unit, and trailing empty ones
    return driver_bytes


def run_failure(err: BaseException, watchdog: Watchdog, output: str) -> tuple[str, BaseException]:
    """(the runs row's `failure`, the error the run ends with) for what stopped it: the watchdog's interrupt as
    `Stalled` (--stall-timeout; committed units stay, a rerun resumes), a storage failure (disk full,
    permission, bucket gone) as `StorageError`, named as such and never blamed on the input; else `err`."""
    if isinstance(err, KeyboardInterrupt) and watchdog.fired:
        err = Stalled(watchdog.fired)
    problem = storage_problem(err, output) if isinstance(err, Exception) else None
    if problem:
        return problem, StorageError(problem)
    return short_error(err), err


def _write_run_row(s: RunSettings, plan: Plan, run: RunRecord, started, seconds: float, counts: dict, failure,
                   quiet: bool = False) -> None:
    """The run's row in OUTPUT/tables/runs/ (`quiet`: the storage already failed; its one line says so)."""
    config = run.config_json(
        batch_size=s.batch_size, actors=s.actors, max_pixels=s.max_pixels, chunk_size=s.chunk_size,
        on_bad_shard=s.on_bad_shard, overwrite=s.overwrite, jpeg_as=s.jpeg_as, png_level=s.png_level, group_by=s.group_by,
        s3=s.s3.public() if (is_s3(s.input) or is_s3(s.output)) else None,
    )
    row = {
        "run_id": run.run_id, "status": "failed" if failure else "completed", "input": s.input, "output": s.output,
        "kind": plan.kind, "config": config, "versions": json.dumps(versions(), sort_keys=True),
        "model": run.model.model, "model_revision": run.model.revision, "method": run.config.method,
        "units_total": len(plan.units), "units_skipped": len(plan.done), **counts,
        "started_at": started, "finished_at": datetime.now(timezone.utc), "seconds": seconds,
        "images_per_second": counts["samples_in"] / seconds if seconds > 0 else 0.0,
        "failure": failure,
    }
    try:
        tables.write_table([row], "runs", posixpath.join(plan.out_root, TABLES_DIR, "runs"), plan.out_fs, basename=run.run_id)
    except Exception as err:  # never hide the run's own failure behind this one
        if not quiet:
            print(f"mimicshield: could not write the runs table: {err}", file=sys.stderr)
