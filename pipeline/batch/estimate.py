"""Know the cost before paying it: one line before a long local run (issue 27).

From the image headers (PIL reads the size without decoding the pixels) of the pending input, the
largest image is found: every file of a folder (up to `MAX_HEADERS`), or the samples of the first
pending shard. The protector is built on this machine and `protect.cost.estimate` measures one step
at a reference size and scales it by FLOPs to that image's working size. When an image would take
longer than `LONG_SECONDS`, one line says so and names the option that would cut it.

Only for local runs: on a cluster (`--address`) the workers' devices are not this machine's. Skipped
for FastProtect (milliseconds per image) and when no working size exceeds `REFERENCE_MIN_SIDE`^2 pixels
(a step there is cheap anywhere; the model is then not even loaded on the driver).
"""

from __future__ import annotations

import io
import os

from PIL import Image

from pipeline.io.storage import parse_uri
from pipeline.io.webdataset import read_shard
from pipeline.protect.cost import REFERENCE_MIN_SIDE, estimate
from pipeline.protect.engine import FASTPROTECT_METHODS

MAX_HEADERS = 2000  # folder files whose headers are read (the largest of them is estimated)
LONG_SECONDS = 600.0  # an image projected to take longer than this gets the warning


def header_size(data_or_file) -> tuple[int, int] | None:
    """(height, width) from an image's header, or None when it is not an image PIL can read."""
    try:
        with Image.open(data_or_file) as img:
            return img.size[1], img.size[0]
    except Exception:
        return None


def largest_pending_image(s, kind: str, pending) -> tuple[int, int] | None:
    """The (h, w) with the most pixels among the pending input's headers (see the module doc)."""
    fs, _, _ = parse_uri(s.input, s.s3)
    sizes = []
    if kind == "shards":
        if pending:
            for row in read_shard(fs, pending[0].inputs[0]):
                if row.get("image"):
                    sizes.append(header_size(io.BytesIO(row["image"])))
    else:
        paths = [p for unit in pending for p in unit.inputs][:MAX_HEADERS]
        for path in paths:
            try:
                with fs.open_input_file(path) as f:
                    sizes.append(header_size(f))
            except OSError:
                continue  # the run reports unreadable files as error rows
    sizes = [size for size in sizes if size]
    return max(sizes, key=lambda hw: hw[0] * hw[1]) if sizes else None


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cost_warning(s, kind: str, pending) -> str | None:
    """The one line to print before a long local run, or None (see the module doc)."""
    if s.address or os.environ.get("RAY_ADDRESS") or s.config.method in FASTPROTECT_METHODS or not pending:
        return None
    size = largest_pending_image(s, kind, pending)
    if size is None:
        return None
    res = s.config.resolution
    if (int(res) ** 2 if res.isdigit() else size[0] * size[1]) <= REFERENCE_MIN_SIDE**2:
        return None  # no working size above 256^2: a step costs milliseconds to a fraction of a second anywhere
    from pipeline.protect import build_protector

    protector = build_protector(s.model.load_all(), s.config)
    try:
        working = protector.working_size(*size)
        if working[0] * working[1] <= REFERENCE_MIN_SIDE**2:
            return None  # (auto on a model trained at 256 or less, like the built-ins)
        guess = estimate(protector, *size)
        device = protector.models.device.type
    finally:
        del protector  # the actors load their own copy: free this one (GPU memory included) now
        free_memory()
    if guess.seconds_per_image < LONG_SECONDS:
        return None
    cut = ("--resolution auto (works at about the model's training area)" if s.config.resolution != "auto"
           else "fewer --steps, a GPU (--device cuda), or --method fastprotect")
    return (f"mimicshield: warning: the largest image ({size[1]}x{size[0]}, working at {working[1]}x{working[0]}, "
            f"--resolution {s.config.resolution}) will take about {guess.seconds_per_image / 60:.0f} min on "
            f"{device} ({guess.seconds_per_step:.1f} s per step x {s.config.steps} steps); "
            f"{cut} would cut it")
