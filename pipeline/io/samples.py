"""Sample rows: `read_samples(uri)` as a Ray Dataset (key, source, image, ext, meta, prompt), and `read_paths`."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from pyarrow import fs as pafs

from pipeline.io.storage import (
    InputError,
    list_images,
    list_shards,
    parse_uri,
    pattern_root,
    same_stem_files,
)
from pipeline.io.webdataset import READER_FIELDS, FileReader, ShardReader

# ---------------------------------------------------------------- rows


SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source", pa.string()),
    ("image", pa.binary()),
    ("ext", pa.string()),
    ("meta", pa.string()),
    ("prompt", pa.string()),  # the sample's own prompt (io/metadata.py: JSON prompt/caption, else .txt)
])
# the pipeline also carries every other member of a sample, untouched
MEMBER_FIELDS = [("member_names", pa.list_(pa.string())), ("member_data", pa.list_(pa.binary()))]


@dataclass
class Normalizer:
    """The schema of sample rows (`SAMPLE_SCHEMA` + members + what the reader found)."""

    uri_prefix: str = ""  # "s3://" for S3 sources: `source` is always a URI
    root: str = ""  # folder root: keys are paths relative to it
    with_members: bool = False

    def schema(self) -> pa.Schema:
        return pa.schema(list(SAMPLE_SCHEMA) + (MEMBER_FIELDS + READER_FIELDS if self.with_members else []))


def read_paths(filesystem: pafs.FileSystem, paths: list[str], kind: str, root: str = "", with_members: bool = False):
    """A Ray Dataset of sample rows from explicit shard or image paths (in that order).

    Shards: one read task per shard (`webdataset.ShardReader`); a shard that cannot be read whole
    gives one row with a null key and stage ``read`` (the protect pipeline, `with_members`) or raises
    `ShardError` (`read_samples`). Folders: `webdataset.FileReader`.
    """
    import ray

    prefix = "s3://" if isinstance(filesystem, pafs.S3FileSystem) else ""
    full = Normalizer(uri_prefix=prefix, root=root, with_members=True).schema()
    paths_ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, min(len(paths), 200)))
    if kind == "shards":
        reader = ShardReader(filesystem, full, prefix, strict=not with_members)  # read_samples: a bad shard raises
        ds = paths_ds.map_batches(reader, batch_size=1, batch_format="pyarrow")
    else:
        ds = paths_ds.map_batches(FileReader(filesystem, full, root, same_stem_files(paths), prefix), batch_size=16,
                                  batch_format="pyarrow")
    if not with_members:
        ds = ds.select_columns(SAMPLE_SCHEMA.names)
    return ds


def read_samples(uri: str, s3=None):
    """A Ray Dataset with one row per sample of `uri`: key, source, image, ext, meta (see module doc)."""
    filesystem, path, kind = parse_uri(uri, s3)
    if kind == "shards":
        paths = list_shards(filesystem, path, uri)
        root = pattern_root(path)
    else:
        paths = list_images(filesystem, path, uri)
        root = path
    if not paths:
        raise InputError(f"no {'shards' if kind == 'shards' else 'images'} found at {uri}")
    return read_paths(filesystem, paths, kind, root=root)
