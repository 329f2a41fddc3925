"""Units of work and how a finished unit is committed: output shard, tables, then a marker.

A *unit* is one input shard (shard input) or a fixed chunk of image files (folder input). Its
outputs have deterministic names derived from the input, so a rerun replaces rather than
duplicates:

    OUTPUT/<relative shard path>                      protected shard (same basename as the input)
    OUTPUT/tables/protect_metrics/<unit>.parquet      one row per written sample
    OUTPUT/tables/errors/<unit>.parquet               one row per failed sample (may be empty)
    OUTPUT/tables/_units/<unit>.json                  commit marker, written last

Resume: a unit whose marker exists (for the same inputs) is skipped. A crash before the marker
leaves files that the rerun overwrites under the same names: no duplicate, nothing missing.
Shards are spooled to a local temporary file while their samples arrive, then uploaded whole
(local output: written beside the target under a hidden name and renamed into place).

Crash windows are testable at one seam, `fault_point(point, unit_id)`, called at each step of a
unit's commit. With ``MIMICSHIELD_FAULT=<point>:<unit id>`` in the environment of the process that
commits, it raises `CommitFault` there (tests only). The points, in order:

    mid-unit         the unit's first sample was added (folder output: its first file is written)
    output-written   the output shard is uploaded (folder output: every file is written)
    tables-written   protect_metrics and errors are written, the marker is not
    committed        the marker is written
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
import tempfile
import uuid
from dataclasses import dataclass, field

from pyarrow import fs as pafs

from . import tables
from .io import TABLES_DIR, to_uri

MARKER_DIR = "_units"  # leading underscore: Parquet dataset readers skip it
SAME_FORMAT = {"jpeg": "jpg", "tiff": "tif"}
FAULT_ENV = "MIMICSHIELD_FAULT"  # tests: "<point>:<unit id>" (see module doc)
FAULT_POINTS = ("mid-unit", "output-written", "tables-written", "committed")


class CommitFault(RuntimeError):
    """Raised on purpose by `fault_point` (FAULT_ENV) to test resuming after a crash."""


def fault_point(point: str, unit_id: str) -> None:
    """The seam where tests crash a unit's commit: raises `CommitFault` when FAULT_ENV names this point."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{point}:{unit_id}":
        raise CommitFault(f"{FAULT_ENV}={spec}: injected crash")


@dataclass
class Unit:
    id: str  # flat, deterministic: names the unit's table files and marker
    inputs: list[str]  # input paths on the input filesystem
    output: str  # output shard path (shards) or output root (folder)

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.inputs).encode()).hexdigest()[:16]


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


def marker_path(out_root: str, unit_id: str) -> str:
    return posixpath.join(out_root, TABLES_DIR, MARKER_DIR, f"{unit_id}.json")


def committed(out_fs: pafs.FileSystem, out_root: str, units: list[Unit]) -> set[str]:
    """Ids of units that an earlier run finished (marker present, same inputs)."""
    root = posixpath.join(out_root, TABLES_DIR, MARKER_DIR)
    infos = out_fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    present = {posixpath.basename(i.path)[: -len(".json")] for i in infos if i.path.endswith(".json")}
    done = set()
    for unit in units:
        if unit.id in present:
            with out_fs.open_input_stream(marker_path(out_root, unit.id)) as f:
                marker = json.loads(f.read())
            if marker.get("inputs_digest") == unit.digest():
                done.add(unit.id)
    return done


def write_bytes(out_fs: pafs.FileSystem, path: str, data: bytes | None = None, local_file: str | None = None) -> None:
    """Write a whole file so that no reader ever sees half of it."""
    out_fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(out_fs, pafs.LocalFileSystem):
        tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        if local_file is not None:
            pafs.copy_files(local_file, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=out_fs)
        else:
            with out_fs.open_output_stream(tmp) as f:
                f.write(data)
        out_fs.move(tmp, path)
        return
    # object stores: an object appears only once its upload completes
    if local_file is not None:
        pafs.copy_files(local_file, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=out_fs)
    else:
        with out_fs.open_output_stream(path) as f:
            f.write(data)


def same_suffix(orig: str | None, new: str) -> str:
    """The member suffix to write: the original one when the format did not change."""
    if orig and SAME_FORMAT.get(orig, orig) == SAME_FORMAT.get(new, new):
        return orig
    return new


class ShardSpool:
    """A WebDataset tar built in a local temporary file (members written as they arrive)."""

    def __init__(self, tmpdir: str):
        fd, self.path = tempfile.mkstemp(suffix=".tar", dir=tmpdir)
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        for suffix, data in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # deterministic bytes
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> str:
        self._tar.close()
        self._file.close()
        return self.path

    def discard(self) -> None:
        try:
            self.close()
        except Exception:
            pass
        if os.path.exists(self.path):
            os.unlink(self.path)


@dataclass
class UnitCounts:
    samples: int = 0
    written: int = 0
    errors: int = 0


@dataclass
class UnitSink:
    """Receives a unit's result rows in order and commits the unit (see module doc)."""

    kind: str
    out_fs: pafs.FileSystem
    out_root: str
    run: dict  # run_id, method, eps, step_size, steps, model, model_revision
    meta_params: dict  # what goes under the "mimicshield" field of each sample's JSON
    tmpdir: str = field(default_factory=tempfile.gettempdir)
    unit: Unit | None = None
    spool: ShardSpool | None = None

    def begin(self, unit: Unit) -> None:
        self.unit, self.counts = unit, UnitCounts()
        self.metrics: list[dict] = []
        self.errors: list[dict] = []
        self.spool = ShardSpool(self.tmpdir) if self.kind == "shards" else None

    def add(self, row: dict) -> None:
        from .stages import protected_meta

        self.counts.samples += 1
        if row["stage"]:
            self.counts.errors += 1
            self.errors.append({"key": row["key"], "source": row["source"], "stage": row["stage"],
                                "reason": row["reason"] or "unknown", "run_id": self.run["run_id"]})
            return
        suffix = same_suffix(row["ext"], row["out_ext"])
        if self.kind == "shards":
            meta_text, meta_name = protected_meta(row["meta"], self.meta_params)
            members = [(suffix, row["image"])]
            extra = dict(zip(row["member_names"] or [], row["member_data"] or []))
            extra[meta_name] = meta_text.encode()
            members += sorted(extra.items())
            self.spool.add(row["key"], members)
            output = to_uri(self.out_fs, self.unit.output)
        else:
            path = posixpath.join(self.out_root, f"{row['key']}.{suffix}")
            write_bytes(self.out_fs, path, row["image"])
            output = to_uri(self.out_fs, path)
        self.counts.written += 1
        if self.counts.written == 1:
            fault_point("mid-unit", self.unit.id)
        self.metrics.append({
            "key": row["key"], "source": row["source"], "output": output, "format": suffix,
            "method": self.run["method"], "eps": float(self.run["eps"]), "step_size": float(self.run["step_size"]),
            "steps": int(self.run["steps"]), "model": self.run["model"], "model_revision": self.run["model_revision"],
            "width": row["width"], "height": row["height"], "linf": row["linf"], "psnr": row["psnr"],
            "ssim": row["ssim"], "lpips": row["lpips"], "seconds": row["seconds"], "device": row["device"],
            "warnings": row["warnings"], "run_id": self.run["run_id"],
        })

    def commit(self) -> UnitCounts:
        """Output shard, then tables, then the marker: the marker means 'all of it is there'."""
        unit = self.unit
        table_root = posixpath.join(self.out_root, TABLES_DIR)
        if self.spool is not None:
            local = self.spool.close()
            try:
                write_bytes(self.out_fs, unit.output, local_file=local)
            finally:
                os.unlink(local)
                self.spool = None
        fault_point("output-written", unit.id)
        tables.write_table(self.metrics, "protect_metrics", posixpath.join(table_root, "protect_metrics"),
                           self.out_fs, basename=unit.id)
        tables.write_table(self.errors, "errors", posixpath.join(table_root, "errors"), self.out_fs, basename=unit.id)
        fault_point("tables-written", unit.id)
        marker = {"unit": unit.id, "inputs_digest": unit.digest(), "inputs": len(unit.inputs),
                  "output": to_uri(self.out_fs, unit.output), "run_id": self.run["run_id"],
                  "samples": self.counts.samples, "written": self.counts.written, "errors": self.counts.errors}
        write_bytes(self.out_fs, marker_path(self.out_root, unit.id), json.dumps(marker).encode())
        self.unit = None
        fault_point("committed", unit.id)
        return self.counts

    def abort(self) -> None:
        if self.spool is not None:
            self.spool.discard()
        self.unit, self.spool = None, None


def first_unreadable(in_fs: pafs.FileSystem, units: list[Unit], limit: int = 16) -> str | None:
    """After a read failure: the first of `units` (at most `limit`) whose tar cannot be read through."""
    for unit in units[:limit]:
        path = unit.inputs[0]
        try:
            with in_fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if member.isfile():
                        tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError):
            return to_uri(in_fs, path)
    return None

