"""Files the project writes whole: one atomic-write rule, and the cache root.

`write_atomic(fs, path, data)` is the one way a file is written so that no reader ever sees half of
it, on any pyarrow filesystem:

- local: the bytes go to a temporary sibling (`temp_sibling`: ``.mimicshield-<12 hex>.tmp``, hidden,
  skipped by every listing, and of a fixed length: a temp name is never longer than the longest name
  the folder holds), which is then renamed over `path` (a rename is atomic on POSIX); an error names
  `path`, not the temp name, and leaves no temp file behind. `remove_stale_temps` deletes those a
  killed run left (a rerun calls it first);
- object stores (S3): an object becomes visible only once its upload completes, so the upload
  goes straight to `path`.

`cache_root()` is where built models and FastProtect banks are kept: ``$MIMICSHIELD_CACHE``, else
``~/.cache/mimicshield``.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from pathlib import Path

from pyarrow import fs as pafs

CACHE_ENV = "MIMICSHIELD_CACHE"


def cache_root() -> Path:
    """$MIMICSHIELD_CACHE, else ~/.cache/mimicshield (created when first written to, not here)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mimicshield")


TEMP_PREFIX = ".mimicshield-"
# ours: .mimicshield-<12 hex>.tmp; older versions wrote .NAME.<8 hex>.tmp
_STALE_TEMP = re.compile(r"^(\.mimicshield-[0-9a-f]{12}|\..+\.[0-9a-f]{8})\.tmp$")


def temp_sibling(path: str) -> str:
    """A hidden, unique temporary name beside `path` (same folder, fixed length), for writing it whole
    and renaming it into place."""
    return posixpath.join(posixpath.dirname(path), f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}.tmp")


def remove_stale_temps(fs: pafs.FileSystem | None, root: str) -> int:
    """Delete the temporary files an interrupted run left under a local `root`; returns how many."""
    if fs is not None and not isinstance(fs, pafs.LocalFileSystem):
        return 0  # object stores: uploads become visible whole or not at all, nothing is left
    removed = 0
    for folder, _, names in os.walk(root):
        for name in names:
            if _STALE_TEMP.match(name):
                try:
                    os.unlink(os.path.join(folder, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


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
        elif local:
            with open(target, "wb") as f:
                f.write(data)
        else:
            with fs.open_output_stream(target) as f:
                f.write(data)
        if local:
            if mode is not None:
                os.chmod(target, mode)
            os.replace(target, path)
    except OSError as err:
        if local and err.errno is not None:  # name the file being written, not its temp name
            raise OSError(err.errno, err.strerror or str(err), path) from err
        raise
    finally:
        if local and os.path.exists(target):
            os.unlink(target)
