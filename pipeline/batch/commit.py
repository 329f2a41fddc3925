"""Units of work, where their outputs go, and how a finished unit is committed.

A *unit* is one input shard (shard input) or a fixed chunk of image files (folder input). Its
outputs have deterministic names derived from the input, so a rerun replaces rather than
duplicates:

    OUTPUT/<relative shard path>                      protected shard (same basename as the input)
    OUTPUT/<relative file path>                       protected file (folder input)
    OUTPUT/tables/protect_metrics/<unit>.parquet      one row per written sample
    OUTPUT/tables/errors/<unit>.parquet               one row per failed sample (may be empty)
    OUTPUT/tables/_units/<unit>.json                  commit marker, written last
    OUTPUT/tables/_parts/<unit>/<run>-<n>.tar         staging: parts of a shard, written by workers

Who writes what: Ray worker tasks encode the protected samples and write them, a folder's files
under their final names, a shard's samples as *parts* (runs of complete tar members, no end
marker) in the staging folder. The driver only receives small per-sample rows (key, part name,
measurements) and commits each unit in input order with `commit_unit`:

    1. output   shards: one worker task concatenates the parts into the final shard (+ tar end
                marker) and uploads it whole (local: written beside it, renamed into place);
                folder: nothing to do, the files are in place
    2. tables   protect_metrics and errors rows of the unit
    3. marker   the unit's id, input fingerprint and counts: "all of it is there"

Resume: a unit whose marker exists for the same inputs (`Unit.fingerprint`: paths, sizes, mtimes)
is skipped. Each marker also records the run's *settings fingerprint* (`RunSettings.fingerprint`:
everything that changes the bytes written); `settings_diff` names what differs when a rerun uses
other settings (the run refuses unless --overwrite). A crash
(``kill -9`` included) anywhere before the marker leaves files that the rerun rewrites under the
same names, and staging parts that the rerun deletes first: no duplicate, nothing missing.

Crash windows are testable at one seam, `fault_point(point, unit_id)` (pipeline/cluster/faults.py), called
by the driver at each step of a unit's commit. With ``MIMICSHIELD_FAULT=<point>:<unit id>`` in the driver's
environment it raises `InjectedFault` there (tests only). The points, in order:

    mid-unit         the driver received the unit's first written sample (workers wrote part of it)
    output-written   the output shard is uploaded (folder output: every file is written)
    tables-written   protect_metrics and errors are written, the marker is not
    committed        the marker is written
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import json
import os
import posixpath
import tarfile
import uuid
from dataclasses import dataclass, field

from pyarrow import fs as pafs

from pipeline.cluster.faults import fault_point
from pipeline.io import tables
from pipeline.io.files import temp_sibling, write_atomic
from pipeline.io.storage import IMAGE_SUFFIXES, TABLES_DIR, read_small_file, to_uri

MARKER_DIR = "_units"  # leading underscore: Parquet dataset readers skip it
PARTS_DIR = "_parts"  # staging parts of shards being written
SAME_FORMAT = {"jpeg": "jpg", "tiff": "tif"}
FAULT_POINTS = ("mid-unit", "output-written", "tables-written", "committed")  # cluster/faults.py


@dataclass
class Unit:
    id: str  # flat, deterministic: names the unit's table files and marker
    inputs: list[str]  # input paths on the input filesystem
    output: str  # output shard path (shards) or output root (folder)
    identity: list[str] | None = None  # per input "size mtime" (planning's listing): a replaced input is new

    def fingerprint(self) -> str:
        """What the marker records about the inputs; a unit is done only for the same fingerprint."""
        parts = self.inputs if self.identity is None else [f"{p}\t{i}" for p, i in zip(self.inputs, self.identity)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def input_identity(info) -> str:
    """What identifies an input file's content cheaply: its size and modification time (S3: LastModified)."""
    mtime = info.mtime_ns if info.mtime_ns is not None else ""
    return f"{info.size} {mtime}"


def settings_diff(recorded: dict | None, current: dict) -> list[str]:
    """'name: recorded -> current' for each setting that differs (a marker without settings: all)."""
    if recorded is None:
        return ["settings: not recorded (written by an older version)"]
    return [f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(recorded) | set(current))
            if recorded.get(k) != current.get(k)]


def _flat(rel: str) -> str:
    return rel.replace("/", "__")


def plan_units(kind: str, paths: list[str], in_root: str, out_root: str, chunk_size: int = 256) -> list[Unit]:
    """Units in input order: one per shard, or chunks of `chunk_size` image files."""
    if kind == "shards":
        units = []
        for path in paths:
            rel = posixpath.relpath(path, in_root) if in_root else posixpath.basename(path)
            if rel.startswith(".."):
                rel = posixpath.basename(path)
            units.append(Unit(id=_flat(rel[: -len(".tar")] if rel.endswith(".tar") else rel), inputs=[path],
                              output=posixpath.join(out_root, rel)))
        ids = [u.id for u in units]
        if len(set(ids)) != len(ids):
            raise ValueError("two input shards map to the same output name; give a common prefix as input")
        return units
    return [
        Unit(id=f"files-{i // chunk_size:06d}", inputs=paths[i : i + chunk_size], output=out_root)
        for i in range(0, len(paths), chunk_size)
    ]


class UnitIndex:
    """Which unit an input path belongs to (built once on the driver, shipped to the read-side tasks).

    Shards: a dict of shard paths. Folders: chunks are contiguous runs of the sorted listing, so
    only each chunk's first path is kept and a lookup is a bisection (small for millions of files).
    """

    def __init__(self, kind: str, units: list[Unit]):
        self.kind = kind
        if kind == "shards":
            self.by_path = {u.inputs[0]: u.id for u in units}
        else:
            self.firsts = [u.inputs[0] for u in units]
            self.ids = [u.id for u in units]

    def __call__(self, path: str) -> str:
        path = path[len("s3://"):] if path.startswith("s3://") else path
        if self.kind == "shards":
            return self.by_path[path]
        return self.ids[bisect.bisect_right(self.firsts, path) - 1]


def marker_path(out_root: str, unit_id: str) -> str:
    return posixpath.join(out_root, TABLES_DIR, MARKER_DIR, f"{unit_id}.json")


def read_markers(out_fs: pafs.FileSystem, out_root: str, units: list[Unit]) -> dict[str, dict]:
    """The markers of `units` an earlier run wrote, by unit id."""
    root = posixpath.join(out_root, TABLES_DIR, MARKER_DIR)
    infos = out_fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    present = {posixpath.basename(i.path)[: -len(".json")] for i in infos if i.path.endswith(".json")}
    markers = {}
    for unit in units:
        if unit.id in present:
            markers[unit.id] = json.loads(read_small_file(out_fs, marker_path(out_root, unit.id)))  # 503-safe (io.py)
    return markers


def committed(out_fs: pafs.FileSystem, out_root: str, units: list[Unit], markers: dict | None = None) -> set[str]:
    """Ids of units that an earlier run finished (marker present, same inputs)."""
    markers = read_markers(out_fs, out_root, units) if markers is None else markers
    return {u.id for u in units if u.id in markers and markers[u.id].get("inputs_digest") == u.fingerprint()}


def same_suffix(orig: str | None, new: str) -> str:
    """The member suffix to write: the original one (``JPG``, ``thumb.jpeg``) when the format did not
    change, else the original with its last part replaced (``thumb.jpg`` written as PNG: ``thumb.png``)."""
    if not orig:
        return new
    head, _, last = orig.rpartition(".")
    low = last.lower()
    if SAME_FORMAT.get(low, low) == SAME_FORMAT.get(new, new) or low not in IMAGE_SUFFIXES:
        return orig  # same format, or an image found by content (``key.preview``): its name is kept
    return f"{head}.{new}" if head else new


# ---------------------------------------------------------------- tar parts

TAR_BLOCK, TAR_RECORD = 512, 10240  # tarfile's block and record sizes
TAR_END = b"\0" * (2 * TAR_BLOCK)  # end-of-archive marker


def tar_members(key: str, members: list[tuple[str, bytes]]) -> bytes:
    """One sample's members as tar blocks (header + data + padding), deterministic bytes.

    PAX format: a plain USTAR header for ordinary names, plus a PAX extended header where a name
    is longer than USTAR holds (> 100 characters) or not ASCII. Concatenating such runs and
    adding `tar_end(size)` gives the same file as tarfile would.
    """
    out = bytearray()
    for suffix, data in members:
        info = tarfile.TarInfo(f"{key}.{suffix}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        out += info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        out += data
        out += b"\0" * (-len(data) % TAR_BLOCK)
    return bytes(out)


def tar_end(size: int) -> bytes:
    """The end-of-archive marker plus padding to a full record, for a tar of `size` member bytes."""
    return TAR_END + b"\0" * (-(size + len(TAR_END)) % TAR_RECORD)


def parts_root(out_root: str) -> str:
    return posixpath.join(out_root, TABLES_DIR, PARTS_DIR)


def parts_dir(out_root: str, unit_id: str) -> str:
    return posixpath.join(parts_root(out_root), unit_id)


def part_path(out_root: str, unit_id: str, run_id: str) -> str:
    """A new, unique staging path for a part of `unit_id`."""
    return posixpath.join(parts_dir(out_root, unit_id), f"{run_id}-{uuid.uuid4().hex[:12]}.tar")


def clear_parts(out_fs: pafs.FileSystem, out_root: str, unit_ids: set[str]) -> int:
    """Delete staging parts left by an interrupted run for `unit_ids` (one listing); returns how many dirs."""
    infos = out_fs.get_file_info(pafs.FileSelector(parts_root(out_root), allow_not_found=True))
    stale = [i.path for i in infos if posixpath.basename(i.path) in unit_ids]
    for path in stale:
        out_fs.delete_dir(path)
    return len(stale)


def assemble_shard(out_fs: pafs.FileSystem, parts: list[str], path: str) -> int:
    """Concatenate tar parts into the shard at `path`, add the end marker; returns its size in bytes.

    Runs in a worker task (stages.assemble_task). Local output: the first part is extended in
    place and renamed (no copy); object stores: one streamed upload, visible once complete.
    A ``.tar.gz`` / ``.tgz`` shard is written gzip-compressed (returns the uncompressed size).
    """
    out_fs.create_dir(posixpath.dirname(path), recursive=True)
    if path.endswith((".tar.gz", ".tgz")):
        return _assemble_gzip(out_fs, parts, path)
    if isinstance(out_fs, pafs.LocalFileSystem) and parts:
        first, size = parts[0], os.path.getsize(parts[0])
        with open(first, "ab") as out:
            for part in parts[1:]:
                with open(part, "rb") as f:
                    size += _copy(f, out)
            out.write(tar_end(size))
        os.replace(first, path)
        return size + len(tar_end(size))
    if isinstance(out_fs, pafs.LocalFileSystem):
        tmp = temp_sibling(path)
        with open(tmp, "wb") as out:
            out.write(tar_end(0))
        os.replace(tmp, path)
        return len(tar_end(0))
    size = 0
    with out_fs.open_output_stream(path) as out:
        for part in parts:
            with out_fs.open_input_stream(part) as f:
                size += _copy(f, out)
        out.write(tar_end(size))
    return size + len(tar_end(size))


def _assemble_gzip(out_fs: pafs.FileSystem, parts: list[str], path: str) -> int:
    local = isinstance(out_fs, pafs.LocalFileSystem)
    target = temp_sibling(path) \
        if local else path
    size = 0
    with out_fs.open_output_stream(target, compression=None) as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        for part in parts:
            with out_fs.open_input_stream(part) as f:
                size += _copy(f, out)
        out.write(tar_end(size))
    if local:
        out_fs.move(target, path)
    return size + len(tar_end(size))


def _copy(src, dst, chunk: int = 8 * 2**20) -> int:
    n = 0
    while True:
        data = src.read(chunk)
        if not data:
            return n
        dst.write(data)
        n += len(data)


# ---------------------------------------------------------------- commit


@dataclass
class UnitCounts:
    samples: int = 0
    written: int = 0
    errors: int = 0


@dataclass
class UnitResult:
    """What the driver gathered for one unit from the workers' small result rows."""

    unit: Unit
    parts: list[str] = field(default_factory=list)  # staging parts, in input order (shards)
    metrics: list[dict] = field(default_factory=list)  # protect_metrics rows
    errors: list[dict] = field(default_factory=list)  # errors rows
    counts: UnitCounts = field(default_factory=UnitCounts)
    node: str | None = None  # Ray node that wrote the unit's last part (where its shard is assembled)


def assemble_here(out_fs: pafs.FileSystem, result: UnitResult) -> int:
    """`assemble_shard` in this process (tests, tools); the pipeline runs it in a worker task instead."""
    return assemble_shard(out_fs, result.parts, result.unit.output)


def write_unit_output(out_fs: pafs.FileSystem, kind: str, result: UnitResult, assemble=assemble_here) -> None:
    """Step 1: the unit's shard from its parts (folder files are already in place)."""
    if kind == "shards":
        assemble(out_fs, result)


def write_unit_tables(out_fs: pafs.FileSystem, out_root: str, result: UnitResult) -> None:
    """Step 2: the unit's protect_metrics and errors files (replacing any from an interrupted run)."""
    table_root = posixpath.join(out_root, TABLES_DIR)
    for name, rows in (("protect_metrics", result.metrics), ("errors", result.errors)):
        tables.write_table(rows, name, posixpath.join(table_root, name), out_fs, basename=result.unit.id)


def write_marker(out_fs: pafs.FileSystem, out_root: str, result: UnitResult, run_id: str,
                 settings: dict | None = None) -> None:
    """Step 3, last: the marker that makes the unit count as done (`committed`), with the settings
    fingerprint of the run that wrote it (`settings_diff` compares a rerun's with it)."""
    unit, c = result.unit, result.counts
    marker = {"unit": unit.id, "inputs_digest": unit.fingerprint(), "inputs": len(unit.inputs),
              "output": to_uri(out_fs, unit.output), "run_id": run_id,
              "samples": c.samples, "written": c.written, "errors": c.errors, "settings": settings}
    write_atomic(out_fs, marker_path(out_root, unit.id), json.dumps(marker, allow_nan=False).encode())


def commit_failed_unit(out_fs: pafs.FileSystem, out_root: str, result: UnitResult) -> None:
    """A shard that could not be read whole: its errors row only; no output, no marker (a rerun retries it)."""
    write_unit_tables(out_fs, out_root, result)
    try:
        out_fs.delete_dir(parts_dir(out_root, result.unit.id))  # parts of samples read before the failure
    except (FileNotFoundError, OSError):
        pass


def commit_unit(out_fs: pafs.FileSystem, out_root: str, kind: str, result: UnitResult, run_id: str,
                assemble=assemble_here, settings: dict | None = None) -> UnitCounts:
    """Commit one finished unit: output, then tables, then marker (see module doc).

    `assemble(out_fs, result)` builds a shard from its parts; the pipeline passes one that runs
    `assemble_shard` in a worker task on the node that wrote the parts, so no image byte passes
    through the driver or its node. A failure
    (or kill) at any step leaves no marker: the next run redoes the unit under the same names.
    """
    write_unit_output(out_fs, kind, result, assemble)
    fault_point("output-written", result.unit.id)
    write_unit_tables(out_fs, out_root, result)
    fault_point("tables-written", result.unit.id)
    write_marker(out_fs, out_root, result, run_id, settings)
    if kind == "shards":
        try:
            out_fs.delete_dir(parts_dir(out_root, result.unit.id))  # also any part of a retried task
        except (FileNotFoundError, OSError):
            pass
    fault_point("committed", result.unit.id)
    return result.counts

