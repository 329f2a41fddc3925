"""Files the project writes whole: one atomic-write rule, and the cache root.

`write_atomic(fs, path, data)` is the one way a file is written so that no reader ever sees half of
it, on any pyarrow filesystem:

- local: the bytes go to a temporary sibling (`temp_sibling`: ``.NAME.<hex>.tmp``, hidden, and
  skipped by every listing), which is then renamed over `path` (a rename is atomic on POSIX);
- object stores (S3): an object becomes visible only once its upload completes, so the upload
  goes straight to `path`.

`cache_root()` is where built models and FastProtect banks are kept: ``$MIMICSHIELD_CACHE``, else
``~/.cache/mimicshield``.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path

from pyarrow import fs as pafs

CACHE_ENV = "MIMICSHIELD_CACHE"


def cache_root() -> Path:
    """$MIMICSHIELD_CACHE, else ~/.cache/mimicshield (created when first written to, not here)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mimicshield")


def temp_sibling(path: str) -> str:
    """A hidden, unique temporary name beside `path`, for writing it whole and renaming it into place."""
    return posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(fs: pafs.FileSystem | None, path: str, data: bytes | None = None,
                 local_file: str | None = None, mode: int | None = None) -> None:
    """Write `data` (or copy `local_file`) to `path` on `fs` (local when None), whole or not at all.

    `mode` sets local file permissions before the rename (e.g. 0o644 for a file shared like a model).
    """
    fs = fs or pafs.LocalFileSystem()
    path = str(path)
    fs.create_dir(posixpath.dirname(path) or ".", recursive=True)
    local = isinstance(fs, pafs.LocalFileSystem)
    target = temp_sibling(path) if local else path
    try:
        if local_file is not None:
            pafs.copy_files(local_file, target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:
            with fs.open_output_stream(target) as f:
                f.write(data)
        if local:
            if mode is not None:
                os.chmod(target, mode)
            fs.move(target, path)
    finally:
        if local and os.path.exists(target):
            os.unlink(target)
