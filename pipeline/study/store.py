"""Where a study keeps everything under OUTPUT (local or s3://), and how it resumes.

    OUTPUT/protected/<source>/                 `protect` outputs, one per (method, eps)
    OUTPUT/purified/<purification>/<source>.tar  purified images (<key>.png members)
    OUTPUT/adapters/<purification>.safetensors  a model-side attack's trained adapters (cat), one per spec
    OUTPUT/tables/robustness/<cell>.parquet    one file per cell: its rows and its commit marker
    OUTPUT/samples/study/<scenario>/<cell>/<key>.in.png / .out.png   what the report's grids show
    OUTPUT/study.json                          the settings' fingerprint and the settings (no credentials)
    OUTPUT/report.html

Every file is written whole or not at all (a temporary name, then a move; an S3 object appears only
once its upload completes), so a study killed at any point and run again computes exactly the missing
purified sets and cells, each once. A rerun with other settings is refused before any work
(`StudySettings.fingerprint`, recorded in study.json); ``--overwrite`` clears every cell, purified set,
adapter and sample first.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile

import numpy as np
from pyarrow import fs as pafs

from pipeline.io.files import write_atomic
from pipeline.io.storage import S3Options
from pipeline.study import adapter
from pipeline.study.grid import Cell, Source, purified_id, slug

TABLE_DIR = "tables/robustness"
WORK = (TABLE_DIR, "purified", "adapters", "samples/study")  # what a study computed (cleared by --overwrite)


class StudyStore:
    def __init__(self, output: str, s3=None):
        self.output = output.rstrip("/")
        self.s3 = S3Options.of(s3)
        self.fs, root = adapter.split_uri(self.output, self.s3)
        self.root = root.rstrip("/")

    # ------------------------------------------------------------ paths

    def protected_uri(self, source: Source) -> str:
        return f"{self.output}/protected/{source.id}"

    def purified_path(self, source: Source, purification: str) -> str:
        return f"{self.root}/purified/{purified_id(source, purification)}.tar"

    def adapter_path(self, purification: str) -> str:
        return f"{self.root}/adapters/{slug(purification.replace(':', '-'))}.safetensors"

    def cell_path(self, cell: Cell) -> str:
        return f"{self.root}/{TABLE_DIR}/{cell.id}.parquet"

    def sample_dir(self, cell: Cell) -> str:
        return f"{self.root}/samples/study/{cell.scenario}/{cell.id}"

    # ------------------------------------------------------------ resume

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def files(self, folder: str, suffix: str) -> set[str]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{folder}", recursive=True,
                                                            allow_not_found=True))
        except FileNotFoundError:
            return set()
        return {i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
                and not posixpath.basename(i.path).startswith("_")}

    def done_cells(self, cells: list[Cell]) -> set[str]:
        present = self.files(TABLE_DIR, ".parquet")
        return {c.id for c in cells if self.cell_path(c) in present}

    def has_work(self) -> bool:
        """Has a run committed any cell, purified set or adapter here?"""
        return any(self.files(folder, suffix) for folder, suffix in
                   ((TABLE_DIR, ".parquet"), ("purified", ".tar"), ("adapters", ".safetensors")))

    def recorded_fingerprint(self) -> dict | None:
        """The settings fingerprint study.json holds (None: no study.json, or one written before fingerprints)."""
        path = f"{self.root}/study.json"
        return json.loads(self.read(path)).get("fingerprint") if self.exists(path) else None

    def clear(self) -> None:
        """Remove every cell, purified set, adapter and sample (``--overwrite``); the protect runs redo their own."""
        for folder in WORK:
            path = f"{self.root}/{folder}"
            if self.fs.get_file_info(path).type == pafs.FileType.Directory:
                self.fs.delete_dir_contents(path)

    def done_purified(self, units: list[tuple[Source, str]]) -> set[tuple[Source, str]]:
        present = self.files("purified", ".tar")
        return {u for u in units if self.purified_path(*u) in present}

    # ------------------------------------------------------------ writing

    def write_atomic(self, path: str, data: bytes) -> None:
        """`data` at `path`, whole or not at all (temporary sibling, then a move)."""
        write_atomic(self.fs, path, data)

    def read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write_purified(self, source: Source, purification: str, images: dict[str, np.ndarray]) -> None:
        self.write_atomic(self.purified_path(source, purification), pack_pngs(images))

    def read_purified(self, source: Source, purification: str) -> dict[str, np.ndarray]:
        return unpack_pngs(self.read(self.purified_path(source, purification)))

    def write_adapter(self, purification: str, tensors: dict, metadata: dict[str, str]) -> None:
        """A model-side attack's adapters (safetensors), whole or not at all: their presence marks them trained."""
        from safetensors.torch import save

        self.write_atomic(self.adapter_path(purification), save(tensors, metadata=metadata))

    def read_adapter(self, purification: str) -> dict | None:
        """The adapters `write_adapter` committed for `purification`, or None when there are none yet."""
        from safetensors.torch import load

        path = self.adapter_path(purification)
        return load(self.read(path)) if self.exists(path) else None

    def write_cell(self, cell: Cell, rows: list[dict]) -> None:
        """The cell's rows as one Parquet file, whole or not at all (the commit)."""
        adapter.write_table(rows, f"{self.root}/{TABLE_DIR}", self.fs, basename=cell.id)

    def write_sample(self, cell: Cell, key: str, kind: str, rgb: np.ndarray) -> None:
        self.write_atomic(f"{self.sample_dir(cell)}/{slug(key)}.{kind}.png", png(rgb))


def png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def pack_pngs(images: dict[str, np.ndarray]) -> bytes:
    """A tar of <key>.png members (WebDataset layout), in key order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key in sorted(images):
            data = png(images[key])
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack_pngs(data: bytes) -> dict[str, np.ndarray]:
    from PIL import Image

    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".png"):
                raw = tar.extractfile(member).read()
                out[member.name[: -len(".png")]] = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    return out
