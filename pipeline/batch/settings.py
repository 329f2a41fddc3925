"""`RunSettings`: one protect run, typed, validated once when built, and the resume fingerprint it derives.

`RunSettings` holds the run's `ProtectConfig` (what to do to each image), its `ModelSpec` (what to
load, where) and the options of the run itself (where from, where to, how spread over Ray). The CLI,
config files, the Ray job, the robustness study and the Python API all build this one object; nothing
re-packs it into a dict.

The fingerprint recorded in every unit's marker (and checked before a resume) is derived from these
objects' fields, so a field added to `ProtectConfig` is in it without anyone remembering to add it;
fields that cannot change the bytes of an output are listed in `NOT_IN_FINGERPRINT`, by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

import torch

from pipeline.cluster.pool import uses_gpu
from pipeline.io.images import DEFAULT_MAX_PIXELS, DEFAULT_PNG_LEVEL
from pipeline.io.storage import S3Options
from pipeline.models.loading import DTYPES, ModelSpec, resolve_dtype
from pipeline.protect import ProtectConfig, check_ensemble_method
from pipeline.protect.engine import FASTPROTECT_METHODS, GROUP_METHODS

# fields that do not change what a unit's outputs hold: how the work is spread, reported and resumed
NOT_IN_FINGERPRINT = {
    "ProtectConfig": (),
    "ModelSpec": ("low_memory",),  # same result, less memory
    "RunSettings": ("input", "output", "config", "model", "batch_size", "actors", "address", "s3",
                    "max_pixels", "chunk_size", "progress", "on_bad_shard", "overwrite", "verbose", "stall_timeout",
                    "max_memory_gb", "follow_external_links", "png_level"),  # png_level: the same pixels, another size
}
FIXED_POLICIES = {"jpeg_quality": "keep"}  # not an option: JPEG sources keep their quantisation tables


def _fields(obj, exclude) -> dict:
    return {f.name: getattr(obj, f.name) for f in fields(obj) if f.name not in exclude}


def _flat(values: dict, prefix: str = "") -> dict:
    """Nested settings objects as dotted names: {"fastprotect": FastProtectOptions(bank=...)} -> {"fastprotect.bank": ...}."""
    out = {}
    for name, value in values.items():
        if is_dataclass(value):
            out.update(_flat({f.name: getattr(value, f.name) for f in fields(value)}, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = float(value) if isinstance(value, float) else value
    return out


def fingerprint_fields(obj, exclude=(), prefix: str = "") -> dict:
    """A settings object's fields but `exclude`, nested settings objects as dotted names (a fingerprint's entries)."""
    return _flat(_fields(obj, exclude), prefix)


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


@dataclass
class RunSettings:
    """One protect run, built once (CLI, config file or Python) and validated when built."""

    input: str
    output: str
    config: ProtectConfig = field(default_factory=ProtectConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    batch_size: int = 4  # images per protection batch
    actors: int | None = None  # protection actors (default: one per GPU, or 1 on CPU)
    address: str | None = None  # Ray address; None: RAY_ADDRESS or a local Ray started in-process
    s3: S3Options = field(default_factory=S3Options)  # endpoint, region, retries (a dict is converted once)
    max_pixels: int = DEFAULT_MAX_PIXELS
    chunk_size: int = 256  # files per unit for folder input
    progress: bool = True
    on_bad_shard: str = "skip"  # a shard that cannot be read whole: "skip" (record it, go on) or "fail"
    overwrite: bool = False  # reprocess every unit, whatever OUTPUT holds (else resume, same settings only)
    jpeg_as: str = "jpeg"  # JPEG sources written as "jpeg" (source tables kept) or "png" (budget exact)
    png_level: int = DEFAULT_PNG_LEVEL  # zlib level of written PNGs: 0 (none, fastest) .. 9 (smallest); same pixels
    verbose: bool = False  # Ray's own logs and progress bars on the terminal (pipeline/cluster/logs.py)
    stall_timeout: float | None = None  # end the run (exit 4) after this long without a finished sample (None: auto)
    max_memory_gb: float | None = None  # memory one protection step may use (None: what the device has free)
    follow_external_links: bool = False  # folder INPUT: follow symbolic links that lead out of it
    group_by: str | None = None  # aspl's group: a JSON field or "folder" (None: JSON group, else artist; else alone)

    def __post_init__(self):
        if not isinstance(self.config, ProtectConfig):
            raise TypeError(f"config must be a ProtectConfig, got {type(self.config).__name__}")
        if not isinstance(self.model, ModelSpec):
            raise TypeError(f"model must be a ModelSpec, got {type(self.model).__name__} (ModelSpec({self.model!r}))")
        check_ensemble_method(self.config.method, len(self.model.model_ids))  # --model A,B: not with fastprotect
        for name in ("batch_size", "chunk_size", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.actors is not None and self.actors < 1:
            raise ValueError("--actors must be >= 1")
        if self.on_bad_shard not in ("skip", "fail"):
            raise ValueError(f"--on-bad-shard must be skip or fail, got {self.on_bad_shard!r}")
        if self.png_level not in range(10):
            raise ValueError(f"--png-level must be 0..9, got {self.png_level!r}")
        if self.jpeg_as not in ("jpeg", "png"):
            raise ValueError(f"--jpeg-as must be jpeg or png, got {self.jpeg_as!r}")
        if self.config.steps == 0 and self.config.method not in FASTPROTECT_METHODS:
            raise ValueError(f"--steps 0 with {self.config.method} would write the PGD start ("
                             f"{'random noise' if self.config.init == 'random' else 'the clean image'}) as protected; "
                             "give --steps >= 1")
        if self.max_memory_gb is not None and not self.max_memory_gb > 0:
            raise ValueError(f"--max-memory must be > 0 GiB, got {self.max_memory_gb!r}")
        if self.stall_timeout is not None and not self.stall_timeout > 0:
            raise ValueError(f"--stall-timeout must be > 0 seconds, got {self.stall_timeout!r}")
        self.s3 = S3Options.of(self.s3)
        if self.group_by is not None and not str(self.group_by).strip():
            raise ValueError("--group-by must name a JSON field or be 'folder'")

    @property
    def grouped(self) -> bool:
        """Does the protection stage receive whole groups (a group method: aspl)?"""
        return self.config.method in GROUP_METHODS

    def uses_gpu(self, gpus: int) -> bool:
        """Do the protection actors run on GPUs, on a cluster with `gpus` GPUs? (cluster/pool.py's rule)"""
        return uses_gpu(self.model.device, gpus)

    def fingerprint(self, gpus: int | None = None) -> dict:
        """Everything that changes the bytes a unit's outputs hold (recorded in each unit's marker).

        Derived from the settings objects, field by field: every field of `ProtectConfig` and of
        `ModelSpec`, and of this object, except those listed in `NOT_IN_FINGERPRINT`. `device` and
        `dtype` are resolved for the hardware the actors get (`gpus`: the cluster's GPU count; None:
        this machine's), so "auto" on a GPU (fp16) and "auto" on a CPU (fp32) never share a fingerprint.
        """
        if gpus is None:
            gpus = torch.cuda.device_count()
        kind = "cuda" if self.uses_gpu(gpus) else "mps" if self.model.device == "mps" else "cpu"
        accelerator = torch.device(kind)
        model = _fields(self.model, NOT_IN_FINGERPRINT["ModelSpec"])
        model.update(device=accelerator.type, dtype=dtype_name(resolve_dtype(self.model.dtype, accelerator)))
        out = {**fingerprint_fields(self.config, NOT_IN_FINGERPRINT["ProtectConfig"]), **model,
               **_fields(self, NOT_IN_FINGERPRINT["RunSettings"]), **FIXED_POLICIES}
        if not self.grouped:  # what only a group method reads cannot change another method's outputs
            out = {k: v for k, v in out.items() if not k.startswith("aspl.") and k != "group_by"}
        return out

    def cpu_batch_size(self) -> int:
        """Rows per decode / encode task: a few protection batches (task overhead amortised)."""
        return max(16, 4 * self.batch_size)
