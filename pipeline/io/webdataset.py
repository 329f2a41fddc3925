"""Reading WebDataset shards (and folders of image files) as sample rows, safely.

    read_shard(fs, path)  -> sample rows       a shard read whole, or `ShardError` naming the reason
    ShardReader / FileReader                   Ray `map_batches` callables: paths in, sample rows out

A shard is checked whole before any of its samples is emitted (its member index, through to the
end-of-archive marker); `.tar.gz` / `.tgz` shards are decompressed into a local spool first (as
are S3 shards: one streamed download, then random access). The rules, each a pure function:

- `member_key(name)`: WebDataset's convention, key = path up to the first dot of the basename.
- `unsafe_name(name)`: absolute paths and `..` parts are refused (tar slip): the sample becomes an
  error row. Link members (sym- or hard links) are never followed: their sample is an error row.
- `group_members(...)`: a sample's members must be adjacent and unique; a key whose members are
  split or repeated becomes one error row, the rest of the shard goes on.
- `image_suffix(suffix, data)`: an image member is one whose suffix is an image suffix (any case:
  `.PNG`, `.JpEg`, `thumb.jpg`) or whose content is one of the formats we write (PNG, JPEG, WebP,
  GIF, BMP, TIFF magic). Every image member is protected; other members pass through byte-exact
  (``.pkl``/``.pt`` are never unpickled).
- `strict_json(data)`: the ``json`` member as text when it is valid UTF-8, strict JSON (no NaN,
  Infinity, or numbers that overflow to them); otherwise None and the member passes through as bytes.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
from pyarrow import fs as pafs

from pipeline.io.metadata import sample_prompt
from pipeline.io.storage import COMPRESSED_SUFFIXES, IMAGE_SUFFIXES, folder_key

SNIFF_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]  # content check: these formats' magic only


class ShardError(ValueError):
    """A shard that cannot be read whole. str() is the reason."""


# ---------------------------------------------------------------- pure rules


def member_key(name: str) -> tuple[str, str]:
    """(key, suffix) of a tar member name: ``dir/a.seg.png`` -> (``dir/a``, ``seg.png``)."""
    folder, base = posixpath.split(name)
    stem, dot, suffix = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), suffix


def unsafe_name(name: str) -> str | None:
    """Why a member name may not be written out (absolute, `..`, empty), or None when it is safe."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return f"unsafe member name {name!r}: absolute path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return f"unsafe member name {name!r}: '..' part"
    if not member_key(name)[0] or not member_key(name)[1]:
        return f"member name {name!r} has no key or no suffix"
    return None


def group_members(members: list[tarfile.TarInfo]) -> tuple[list[tuple[str, list[tarfile.TarInfo]]], dict[str, str]]:
    """Samples in shard order, and {key: reason} for the keys that cannot be written.

    Directories are ignored. A key is refused when a member name is unsafe, a member is a link or
    not a regular file, a member name repeats, or its members are not adjacent.
    """
    samples: list[tuple[str, list[tarfile.TarInfo]]] = []
    where: dict[str, int] = {}
    bad: dict[str, str] = {}
    for m in members:
        if m.isdir():
            continue
        key, suffix = member_key(m.name)
        reason = unsafe_name(m.name)
        if key in where and where[key] != len(samples) - 1:
            reason = reason or f"members of key {key!r} are not adjacent in the shard ({m.name} comes later)"
        if key not in where:
            where[key] = len(samples)
            samples.append((key, []))
        group = samples[where[key]][1]
        if any(member_key(o.name)[1] == suffix for o in group):
            reason = reason or f"duplicated member {m.name}"
        if m.issym() or m.islnk():
            reason = reason or f"link member {m.name} -> {m.linkname} (links are never followed)"
        elif not m.isfile():
            reason = reason or f"member {m.name} is not a regular file"
        if reason and key not in bad:
            bad[key] = reason
        group.append(m)
    return samples, bad


def image_suffix(suffix: str, data: bytes) -> bool:
    """True when a member is an image: by suffix (last part, any case) or by content."""
    if suffix.rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES:
        return True
    if suffix.rsplit(".", 1)[-1].lower() in ("json", "txt", "cls", "pkl", "pickle", "pyd", "pt", "pth", "npy"):
        return False
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=SNIFF_FORMATS):
            return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def primary_image(suffixes: list[str]) -> str | None:
    """Which image member fills the `image` column: by IMAGE_SUFFIXES order, then name order."""
    if not suffixes:
        return None

    def rank(s: str) -> tuple[int, str]:
        last = s.rsplit(".", 1)[-1].lower()
        return (IMAGE_SUFFIXES.index(last) if last in IMAGE_SUFFIXES and "." not in s else len(IMAGE_SUFFIXES), s)

    return min(suffixes, key=rank)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows to {value}")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def strict_json(data: bytes | None) -> str | None:
    """The member as text when it is valid UTF-8 strict JSON (no NaN/Infinity/overflow), else None."""
    if data is None:
        return None
    try:
        text = bytes(data).decode("utf-8")
        json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return text


def sample_row(key: str, source: str, members: dict[str, bytes], bad: str | None = None) -> dict:
    """One row of io.SAMPLE_SCHEMA + MEMBER_FIELDS + reader fields from a sample's members."""
    row = {"key": key, "source": source, "image": None, "ext": None, "meta": None, "prompt": None, "member_names": [],
           "member_data": [], "more_images": [], "stage": None, "reason": None}
    if bad:
        row.update(stage="read", reason=bad)
        return row
    images = [s for s, d in members.items() if image_suffix(s, d)]
    ext = primary_image(images)
    rest = sorted(s for s in members if s != ext)
    meta = strict_json(members.get("json"))
    row.update(image=members[ext] if ext else None, ext=ext, meta=meta, prompt=sample_prompt(meta, members.get("txt")),
               member_names=rest, member_data=[members[s] for s in rest],
               more_images=sorted(s for s in images if s != ext))
    return row


# ---------------------------------------------------------------- shards


def is_compressed(path: str) -> bool:
    return path.endswith(COMPRESSED_SUFFIXES)


@contextlib.contextmanager
def local_tar(filesystem: pafs.FileSystem, path: str) -> Iterator[str]:
    """A local, uncompressed, seekable copy of the shard (the file itself when it already is one)."""
    if isinstance(filesystem, pafs.LocalFileSystem) and not is_compressed(path):
        yield path
        return
    fd, spool = tempfile.mkstemp(prefix="mimicshield-shard-", suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as out, filesystem.open_input_stream(path, compression=None) as raw:
            src = gzip.GzipFile(fileobj=raw) if is_compressed(path) else raw
            shutil.copyfileobj(src, out, 8 * 2**20)
        yield spool
    finally:
        os.unlink(spool)


def shard_index(tar_path: str) -> list[tarfile.TarInfo]:
    """Every member header of a plain tar, checked through to its end (`ShardError` otherwise).

    tarfile stops quietly at a bad header after the first one; what follows the last member must
    be the zero blocks of the end-of-archive marker, else the shard is corrupt or truncated.
    """
    size = os.path.getsize(tar_path)
    if size == 0:
        raise ShardError("empty file (0 bytes)")
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            members = tar.getmembers()
            end = tar.offset
    except tarfile.TarError as err:
        raise ShardError(f"not a readable tar: {err}") from None
    last = max((m.offset_data + m.size for m in members), default=0)
    if last > size:
        raise ShardError(f"truncated: member {members[-1].name} ends at byte {last}, file has {size}")
    with open(tar_path, "rb") as f:
        f.seek(end)
        while chunk := f.read(2**20):
            if chunk.strip(b"\0"):
                raise ShardError(f"corrupt or truncated tar: unreadable data at byte {end}")
    return members


def read_shard(filesystem: pafs.FileSystem, path: str, uri_prefix: str = "") -> Iterator[dict]:
    """The shard's sample rows in order; `ShardError` (before any row) when it cannot be read whole."""
    source = uri_prefix + path
    try:
        with local_tar(filesystem, path) as tar_path:
            members = shard_index(tar_path)
            samples, bad = group_members(members)
            with tarfile.open(tar_path, mode="r:") as tar:
                for key, group in samples:
                    if key in bad:
                        yield sample_row(key, source, {}, bad[key])
                        continue
                    data = {member_key(m.name)[1]: tar.extractfile(m).read() for m in group if m.isfile()}
                    yield sample_row(key, source, data)
    except ShardError:
        raise
    except (OSError, EOFError, tarfile.TarError, zlib.error, gzip.BadGzipFile) as err:
        raise ShardError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'read failed'}") from None


def shard_failure_row(source: str, reason: str) -> dict:
    """The one row a shard that cannot be read becomes (key null: the driver names the shard)."""
    row = sample_row("", source, {}, f"cannot read shard {source}: {reason}")
    row["key"] = None
    return row


READER_FIELDS = [("more_images", pa.list_(pa.string())), ("stage", pa.string()), ("reason", pa.string())]


@dataclass
class ShardReader:
    """`map_batches` callable: rows of shard ``path`` in, batches of sample rows out (streamed)."""

    filesystem: pafs.FileSystem
    schema: pa.Schema
    uri_prefix: str = ""
    rows_per_batch: int = 16
    strict: bool = False  # raise `ShardError` (io.read_samples: evaluation, training) instead of a failure row

    def __call__(self, batch: pa.Table):
        for path in batch.column("path").to_pylist():
            rows: list[dict] = []
            try:
                for row in read_shard(self.filesystem, path, self.uri_prefix):
                    rows.append(row)
                    if len(rows) >= self.rows_per_batch:
                        yield pa.Table.from_pylist(rows, schema=self.schema)
                        rows = []
            except ShardError as err:
                if self.strict:
                    raise ShardError(f"cannot read shard {self.uri_prefix + path}: {err}") from None
                rows = [shard_failure_row(self.uri_prefix + path, str(err))]  # the driver drops what came before
            if rows:
                yield pa.Table.from_pylist(rows, schema=self.schema)


@dataclass
class FileReader:
    """`map_batches` callable: image file paths in, one sample row each (unreadable: an error row)."""

    filesystem: pafs.FileSystem
    schema: pa.Schema
    root: str  # keys are paths relative to it (io.folder_key)
    same_stem: set  # files whose key keeps its suffix (io.same_stem_files)
    uri_prefix: str = ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for path in batch.column("path").to_pylist():
            ext = posixpath.splitext(path)[1].lstrip(".")
            row = sample_row(folder_key(path, self.root, self.same_stem), self.uri_prefix + path, {})
            try:
                with self.filesystem.open_input_stream(path, compression=None) as f:
                    row.update(image=f.read(), ext=ext)
            except OSError as err:
                row.update(stage="read", reason=f"cannot read {path}: {str(err).splitlines()[0]}")
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=self.schema)
