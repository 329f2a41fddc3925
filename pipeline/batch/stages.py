"""The Ray Data stages between reading samples and committing units.

    rows from io.read_paths (key, source, image, ext, meta, member_names, member_data, more_images,
                             stage/reason when the reader refused the sample; key null: a bad shard)
      -> Decoder        CPU tasks: size checked on the header, decoded once; pixels + what encoding
                        needs (format, mode, alpha, 16-bit plane, EXIF, ICC) go on as Arrow columns
      -> ProtectActor   an actor pool, model loaded once per actor (one GPU each when present):
                        tensor work only, uint8 pixels in, the int16 perturbation that is written out
      -> Encoder        CPU tasks: apply, encode in the source format, measure the written file
      -> Writer         CPU tasks (fused with Encoder): write folder files under their final names,
                        shard samples as staging parts (commit.py); emit small rows, no image bytes
      -> the driver commits units in order (driver.py, commit.commit_unit)

Every stage maps a pyarrow batch to a pyarrow batch of a fixed schema, and every input row gives
exactly one output row: samples in = samples written + error rows, by construction. A bad sample
becomes a row with `stage` and `reason` set, never a crash. The per-sample work is encoded.py's
(`decode`, `quantize`, `finish`), the same functions `protect_encoded` runs in one process.

Shaped for archive inputs: one row per sample; a sample's other image members (`more_images`,
held in its member columns) are decoded, protected and encoded with it, each in its own format,
so the sample is written whole or is one error row. Every row carries its `unit`, so the writer
never needs to know where the unit ends; the driver does, because rows arrive in input order.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyarrow import fs as pafs

from pipeline.batch.commit import (
    assemble_shard,
    part_path,
    same_suffix,
    tar_members,
)
from pipeline.cluster.faults import fault_point
from pipeline.io.files import write_atomic
from pipeline.io.images import DEFAULT_MAX_PIXELS, DEFAULT_PNG_LEVEL, DecodedImage, ImageError
from pipeline.io.metadata import protection_group, sample_meta
from pipeline.io.paths import name_problem
from pipeline.io.samples import MEMBER_FIELDS
from pipeline.io.storage import to_uri
from pipeline.metrics.lpips import LPIPS
from pipeline.protect import build_protector
from pipeline.protect.encoded import decode, finish, quantize
from pipeline.protect.engine import FASTPROTECT_METHODS

# what the Decoder passes on: the sample's metadata and members, and the decoded image
DECODED_SCHEMA = pa.schema(
    [("key", pa.string()), ("source", pa.string()), ("unit", pa.string()), ("ext", pa.string()), ("meta", pa.string())]
    + MEMBER_FIELDS + [
        ("more_images", pa.list_(pa.string())),  # other image members (in member_names), protected too
        ("prompt", pa.string()),  # the sample's own prompt (JSON prompt/caption or .txt), else null
        ("stage", pa.string()),  # set when the sample failed: read, decode, protect, encode
        ("reason", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("rgb", pa.binary()),  # H x W x 3 uint8, what protection sees
        ("format", pa.string()),
        ("mode", pa.string()),
        ("alpha", pa.binary()),  # H x W uint8, or null
        ("gray16", pa.binary()),  # H x W uint16 source plane of 16-bit grayscale images, or null
        ("exif", pa.binary()),
        ("icc", pa.binary()),
        ("bits", pa.int64()),
        ("jpeg_qtables", pa.string()),  # JSON {index: 64 values} of a JPEG source, or null
        ("jpeg_subsampling", pa.int64()),
        ("jpeg_source", pa.binary()),  # a JPEG source's own file (its coefficients are written back), or null
        ("group", pa.string()),  # what a group method (aspl) protects together (io/metadata.protection_group)
    ]
)
# what the ProtectActor adds
PROTECTED_FIELDS = [
    ("delta", pa.binary()),  # H x W x 3 int16: the quantised perturbation, |delta| <= floor(eps)
    ("more_deltas", pa.list_(pa.binary())),  # the same for each of `more_images`, in order
    ("seconds", pa.float64()),  # protection seconds per image (the batch's time / its images)
    ("device", pa.string()),
]
# what the Writer emits, and all the driver ever receives: no image bytes
RESULT_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("unit", pa.string()),
    ("part", pa.string()),  # staging part holding the sample (shards), else null
    ("output", pa.string()),  # URI of the written shard or file
    ("format", pa.string()),  # suffix of the written image member
    ("width", pa.int64()), ("height", pa.int64()),
    ("linf", pa.float64()), ("psnr", pa.float64()), ("ssim", pa.float64()),
    ("lpips", pa.float64()),  # only with --lpips-weights (a random backbone is not reported)
    ("seconds", pa.float64()), ("device", pa.string()), ("warnings", pa.string()),
    ("more_metrics", pa.string()),  # JSON list: format + measurements of each other image member
    ("stage", pa.string()), ("reason", pa.string()),
    ("node", pa.string()),  # Ray node that wrote it (benchmarks, debugging)
])


def pack_decoded(image: DecodedImage) -> dict:
    """A `DecodedImage` as DECODED_SCHEMA columns (raw buffers plus shape)."""
    h, w = image.size
    return {"width": w, "height": h, "rgb": image.rgb.tobytes(), "format": image.format, "mode": image.mode,
            "alpha": None if image.alpha is None else image.alpha.tobytes(),
            "gray16": None if image.gray16 is None else image.gray16.astype("<u2").tobytes(),
            "exif": image.exif, "icc": image.icc_profile, "bits": image.bits,
            "jpeg_qtables": None if image.jpeg_qtables is None else json.dumps(image.jpeg_qtables),
            "jpeg_subsampling": image.jpeg_subsampling, "jpeg_source": image.jpeg_source}


def unpack_decoded(row: dict) -> DecodedImage:
    h, w = row["height"], row["width"]
    return DecodedImage(
        rgb=unpack_rgb(row["rgb"], h, w), format=row["format"], mode=row["mode"],
        alpha=None if row["alpha"] is None else np.frombuffer(row["alpha"], np.uint8).reshape(h, w),
        gray16=None if row["gray16"] is None else np.frombuffer(row["gray16"], "<u2").reshape(h, w).astype(np.uint16),
        exif=row["exif"], icc_profile=row["icc"], bits=row["bits"],
        jpeg_qtables=None if not row.get("jpeg_qtables") else {int(k): v for k, v in json.loads(row["jpeg_qtables"]).items()},
        jpeg_subsampling=row.get("jpeg_subsampling"), jpeg_source=row.get("jpeg_source"),
    )


def unpack_rgb(data: bytes, height: int, width: int) -> np.ndarray:
    return np.frombuffer(data, np.uint8).reshape(height, width, 3)


# ---------------------------------------------------------------- decode (CPU tasks)


@dataclass
class Decoder:
    """Decode each image once (size limit checked on the header, before decoding).

    Every other image member of a sample is decoded too, as a check: a sample whose images cannot
    all be protected is an error row as a whole. Rows the reader refused (stage set) pass on.
    """

    unit_of: object  # shards.UnitIndex: input path -> unit id
    max_pixels: int = DEFAULT_MAX_PIXELS
    group_by: str | None = None  # RunSettings.group_by (used by group methods only)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            image = row.pop("image")
            row.update(unit=self.unit_of(row["source"]), more_images=row.get("more_images") or [],
                       group=protection_group(row["key"] or "", sample_meta(row.get("meta")), self.group_by))
            if row.get("stage"):  # refused by the reader: unreadable shard, unsafe name, link, duplicate key
                out.append(row)
                continue
            row.update(stage=None, reason=None)  # `prompt` came with the row (io/metadata.py)
            try:
                row.update(pack_decoded(decode(image, self.max_pixels)))
                members = dict(zip(row["member_names"] or [], row["member_data"] or []))
                for suffix in row["more_images"]:
                    try:
                        decode(members[suffix], self.max_pixels)
                    except ImageError as err:
                        raise ImageError(f"image member .{suffix}: {err}") from None
            except ImageError as err:
                row.update(stage="read" if image is None else "decode", reason=str(err))
            out.append(row)
        return pa.Table.from_pylist(out, schema=DECODED_SCHEMA)


# ---------------------------------------------------------------- protect (actors)


class ProtectActor:
    """Callable class for `map_batches(compute=ActorPoolStrategy(...))`: loads the model once.

    For a group method (aspl) the driver calls it through `groupby("group").map_groups(...)`: each call is
    then one group, whole, and the protector protects the batch's images together (batch/driver.py).

    Only tensor work happens here: pixels in, quantised perturbations out; the other columns pass
    through as Arrow buffers, untouched. Images of any mix of sizes can share a batch: the engine
    groups them by working size internally.
    """

    def __init__(self, model, config, threads: int | None = None, max_memory_gb: float | None = None):
        import torch

        from pipeline.protect.cost import MemoryGate

        if threads:
            torch.set_num_threads(int(threads))
        members = model.load_all()  # a ModelSpec, already on this actor's device; A,B: an ensemble
        self.protector = build_protector(members, config)
        gated = config.method not in FASTPROTECT_METHODS  # (aspl's surrogate is counted: Protector.resident_bytes)
        self.memory = MemoryGate(self.protector, max_memory_gb) if gated else None
        models = members[0]
        self.device = str(models.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        stage, reason = batch.column("stage").to_pylist(), batch.column("reason").to_pylist()
        delta: list[bytes | None] = [None] * n
        more: list[list[bytes] | None] = [None] * n
        seconds: list[float | None] = [None] * n
        todo = [i for i in range(n) if stage[i] is None]
        if self.memory is not None:  # a step that cannot fit is the sample's error row, never an OOM-killed actor
            heights, widths = batch.column("height").to_pylist(), batch.column("width").to_pylist()
            for i in list(todo):
                refused = self.memory.refusal(heights[i], widths[i])
                if refused:
                    stage[i], reason[i] = "protect", refused
                    todo.remove(i)
        if todo:
            cols = {c: batch.column(c).take(todo).to_pylist()
                    for c in ("key", "prompt", "rgb", "width", "height", "more_images", "member_names", "member_data")}
            images = [unpack_rgb(d, h, w) for d, h, w in zip(cols["rgb"], cols["height"], cols["width"])]
            keys, prompts, owners = list(cols["key"]), list(cols["prompt"]), []
            for j, i in enumerate(todo):  # a sample's other image members: same prompt, their own key
                members = dict(zip(cols["member_names"][j] or [], cols["member_data"][j] or []))
                for suffix in cols["more_images"][j] or []:
                    images.append(decode(members[suffix], 2**62).rgb)  # size already checked by the Decoder
                    keys.append(f"{cols['key'][j]}.{suffix}")
                    prompts.append(cols["prompt"][j])
                    owners.append(i)
            start = time.perf_counter()
            try:
                deltas = self.protector.protect(images, keys=keys, prompts=prompts)
                each = (time.perf_counter() - start) / len(images)
                eps = self.protector.config.eps
                for i, d in zip(todo, deltas):
                    delta[i], seconds[i], more[i] = quantize(d, eps).tobytes(), each, []
                for i, d in zip(owners, deltas[len(todo):]):
                    more[i].append(quantize(d, eps).tobytes())
            except Exception as err:  # e.g. out of memory on one huge image: fail the batch's rows, not the job
                for i in todo:
                    stage[i], reason[i] = "protect", f"{type(err).__name__}: {err}"
        batch = batch.set_column(batch.schema.get_field_index("stage"), "stage", pa.array(stage, pa.string()))
        batch = batch.set_column(batch.schema.get_field_index("reason"), "reason", pa.array(reason, pa.string()))
        for name, typ in PROTECTED_FIELDS:
            values = {"delta": delta, "more_deltas": more, "seconds": seconds, "device": [self.device] * n}[name]
            batch = batch.append_column(name, pa.array(values, typ))
        return batch


# ---------------------------------------------------------------- encode + write (CPU tasks)

_LPIPS: dict[str, LPIPS] = {}  # weights path -> the LPIPS metric, its network built once per worker process


def lpips_metric(weights: str) -> LPIPS:
    """LPIPS on CPU with calibrated AlexNet weights (cached per process)."""
    if weights not in _LPIPS:
        _LPIPS[weights] = LPIPS(weights, "cpu")
    return _LPIPS[weights]


@dataclass
class Encoder:
    """Apply each perturbation, encode in the source format, measure the written file.

    Emits the DECODED columns needed to write (key, source, unit, ext, meta, members), the encoded
    bytes (`data`, `out_ext`) and the measurements; pixels are dropped here.
    """

    eps: float
    max_pixels: int = DEFAULT_MAX_PIXELS
    lpips_weights: str | None = None  # LPIPS in protect_metrics only with calibrated weights
    jpeg_as: str = "jpeg"  # "png": JPEG sources are written as PNG (RunSettings.jpeg_as)
    png_level: int = DEFAULT_PNG_LEVEL  # zlib level of written PNGs (RunSettings.png_level)

    SCHEMA = pa.schema(
        [("key", pa.string()), ("source", pa.string()), ("unit", pa.string()), ("ext", pa.string()),
         ("meta", pa.string())] + MEMBER_FIELDS + [
            ("data", pa.binary()), ("out_ext", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
            ("linf", pa.float64()), ("psnr", pa.float64()), ("ssim", pa.float64()), ("lpips", pa.float64()),
            ("seconds", pa.float64()), ("device", pa.string()), ("warnings", pa.string()),
            ("more_metrics", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
        ]
    )

    def __call__(self, batch: pa.Table) -> pa.Table:
        lpips = lpips_metric(self.lpips_weights) if self.lpips_weights else None
        out = []
        for row in batch.to_pylist():
            res = {k: row[k] for k in ("key", "source", "unit", "ext", "meta", "member_names", "member_data",
                                       "width", "height", "seconds", "device", "stage", "reason")}
            if not row["stage"]:
                h, w = row["height"], row["width"]
                delta = np.frombuffer(row["delta"], np.int16).reshape(h, w, 3)
                done = finish(row["key"], unpack_decoded(row), delta, self.eps, row["seconds"], self.max_pixels, lpips,
                              self.jpeg_as, self.png_level)
                if done.error:
                    res.update(stage=done.stage, reason=done.error)
                else:
                    m = done.metrics
                    res.update(data=done.data, out_ext=done.ext, linf=m["linf"], psnr=m["psnr"], ssim=m["ssim"],
                               lpips=m.get("lpips"), warnings="; ".join(done.warnings) or None)
                    self.finish_more(row, res, lpips)
            out.append(res)
        return pa.Table.from_pylist(out, schema=self.SCHEMA)


    def finish_more(self, row: dict, res: dict, lpips) -> None:
        """Protect-and-encode each other image member in place (its own format, same key);
        any failure makes the whole sample an error row: no image leaves unprotected."""
        names, datas, measured = list(res["member_names"] or []), list(res["member_data"] or []), []
        for suffix, delta_bytes in zip(row["more_images"] or [], row["more_deltas"] or []):
            i = names.index(suffix)
            try:
                image = decode(datas[i], self.max_pixels)
            except ImageError as err:
                res.update(stage="decode", reason=f"image member .{suffix}: {err}", data=None)
                return
            h, w = image.size
            delta = np.frombuffer(delta_bytes, np.int16).reshape(h, w, 3)
            done = finish(f"{row['key']}.{suffix}", image, delta, self.eps, row["seconds"], self.max_pixels, lpips,
                          self.jpeg_as, self.png_level)
            if done.error:
                res.update(stage=done.stage, reason=f"image member .{suffix}: {done.error}", data=None)
                return
            new = same_suffix(suffix, done.ext)
            if new != suffix and new in {*names, same_suffix(row["ext"], res["out_ext"])}:
                new = f"{suffix}.{done.ext}"  # --jpeg-as png beside a .png member: ``jpg.png``, never a duplicate
            names[i], datas[i] = new, done.data
            measured.append({"format": names[i], "width": w, "height": h, "warnings": "; ".join(done.warnings) or None,
                             **{k: done.metrics.get(k) for k in ("linf", "psnr", "ssim", "lpips")}})
        res.update(member_names=names, member_data=datas,
                   more_metrics=json.dumps(measured, allow_nan=False) if measured else None)


def protected_meta(meta: str | None, params: dict, json_member: bool = False) -> tuple[str, str | None]:
    """(json text for the output sample, name of the member holding it).

    The protection parameters go under a ``mimicshield`` field of the sample's JSON object.
    A sample without JSON gets one; a JSON member that is not an object, or not strict UTF-8 JSON
    at all (`meta` None while `json_member`), is kept byte for byte and the parameters go into a
    separate ``mimicshield.json`` member instead. What we write is strict JSON (no NaN/Infinity).
    """
    if meta is None:
        return json.dumps({"mimicshield": params}, allow_nan=False), "mimicshield.json" if json_member else "json"
    value = sample_meta(meta)
    if value is None:
        return json.dumps({"mimicshield": params}, allow_nan=False), "mimicshield.json"
    value = dict(value)
    value["mimicshield"] = params
    return json.dumps(value, ensure_ascii=False, allow_nan=False), "json"


@dataclass
class Writer:
    """Write the encoded samples from the worker; emit one small RESULT_SCHEMA row per sample.

    Folder input: each file at OUTPUT/<key>.<suffix> (whole-file writes). Shard input: the batch's
    samples of each unit as one staging part (tar members, shards.tar_members); the driver's
    commit concatenates a unit's parts into its shard.
    """

    kind: str  # "shards" or "folder"
    out_fs: object  # pyarrow FileSystem of OUTPUT
    out_root: str
    unit_outputs: dict  # unit id -> output shard path (shards)
    sample_params: dict  # RunRecord.sample_params(): the "mimicshield" field of each sample's JSON
    run_id: str
    in_root: str = ""  # folder input: files are written at their path relative to it
    fault: str | None = None  # the driver's MIMICSHIELD_FAULT (tests: `write-enospc:<key>`, cluster/faults.py)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        out, parts = [], {}  # unit id -> [tar bytes]
        for row in batch.to_pylist():
            res = {k: row.get(k) for k in RESULT_SCHEMA.names}
            res["node"] = node
            if not row["stage"]:
                suffix = same_suffix(row["ext"], row["out_ext"])
                res["format"] = suffix
                if self.kind == "shards":
                    extra = dict(zip(row["member_names"] or [], row["member_data"] or []))
                    meta_text, meta_name = protected_meta(row["meta"], self.sample_params, "json" in extra)
                    extra[meta_name] = meta_text.encode()
                    members = [(suffix, row["data"]), *sorted(extra.items())]
                    parts.setdefault(row["unit"], []).append(tar_members(row["key"], members))
                    res["output"] = to_uri(self.out_fs, self.unit_outputs[row["unit"]])
                else:
                    path = posixpath.join(self.out_root, self.output_name(row, suffix))
                    problem = self.write_file(path, row)
                    if problem:  # a name the destination cannot hold: this sample's error row, not the unit's failure
                        res.update(stage="write", reason=problem, format=None)
                    else:
                        res["output"] = to_uri(self.out_fs, path)
            out.append(res)
        names = {}
        for unit, chunks in parts.items():
            names[unit] = part_path(self.out_root, unit, self.run_id)
            write_atomic(self.out_fs, names[unit], b"".join(chunks))
        for res in out:
            if not res["stage"] and self.kind == "shards":
                res["part"] = names[res["unit"]]
        return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)

    def write_file(self, path: str, row: dict) -> str | None:
        """Write one folder output; returns why its name cannot be held (the sample's error), else None.
        Storage failures (disk full, permission, S3 access) raise: they end the run (`paths.storage_problem`)."""
        import errno

        problem = name_problem(path, s3=not isinstance(self.out_fs, pafs.LocalFileSystem))
        if problem:
            return problem
        fault_point("write-enospc", row["key"], spec=self.fault,
                    error=OSError(errno.ENOSPC, "No space left on device (injected)", path))
        try:
            write_atomic(self.out_fs, path, row["data"])
        except OSError as err:
            if err.errno == errno.ENAMETOOLONG or "KeyTooLong" in str(err):
                return f"output name too long for the destination: {err.strerror or err}"
            raise
        return None

    def output_name(self, row: dict, suffix: str) -> str:
        """Folder output: the input's relative path, its suffix that of the written format.

        A file whose key keeps its suffix (``a.jpg`` beside ``a.png``, io.folder_key) and changes
        format (--jpeg-as png) gets the new suffix appended (``a.jpg.png``): never the other's name.
        """
        if not self.in_root:
            return f"{row['key']}.{suffix}"
        source = row["source"][len("s3://"):] if row["source"].startswith("s3://") else row["source"]
        rel = posixpath.relpath(source, self.in_root)
        stem, ext = posixpath.splitext(rel)
        if ext.lstrip(".") == suffix:
            return rel
        return f"{rel}.{suffix}" if row["key"] == rel else f"{stem}.{suffix}"


def assemble_task(out_fs, parts: list[str], path: str) -> tuple[int, str]:
    """Ray task body: `shards.assemble_shard` on a worker; returns (bytes written, node id)."""
    import ray

    return assemble_shard(out_fs, parts, path), ray.get_runtime_context().get_node_id()
