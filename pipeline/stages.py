"""The Ray Data stages between reading samples and writing them: validate (CPU) and protect (actors).

    rows from io.read_paths (key, source, image, ext, meta, member_names, member_data)
      -> Validator        CPU tasks: decode once; a bad sample becomes an error row, never a crash
      -> ProtectActor     an actor pool, the model loaded once per actor (one GPU each when present):
                          protect_encoded = decode, PGD, re-encode in the source format, measure
      -> rows of RESULT_SCHEMA, one per input sample, in input order (written by shards.py)

Every stage maps a pyarrow batch to a pyarrow batch of a fixed schema, and every input row gives
exactly one output row: samples in = samples written + error rows, by construction.
"""

from __future__ import annotations

import json

import pyarrow as pa

from .images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from .io import MEMBER_FIELDS, SAMPLE_SCHEMA, sample_meta

VALIDATED_SCHEMA = pa.schema(
    list(SAMPLE_SCHEMA) + MEMBER_FIELDS + [
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("stage", pa.string()),  # set when the sample failed: read, decode, protect, encode
        ("reason", pa.string()),
    ]
)
RESULT_SCHEMA = pa.schema(
    list(VALIDATED_SCHEMA) + [
        ("out_ext", pa.string()),  # suffix of the protected image in `image`
        ("linf", pa.float64()),
        ("psnr", pa.float64()),
        ("ssim", pa.float64()),
        ("lpips", pa.float64()),  # only with --lpips-weights (a random backbone is not reported)
        ("seconds", pa.float64()),
        ("device", pa.string()),
        ("warnings", pa.string()),
    ]
)


def _rows(batch: pa.Table) -> list[dict]:
    return batch.to_pylist()


class Validator:
    """CPU stage: decode each image once (size limit checked on the header, before decoding)."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = max_pixels

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in _rows(batch):
            row.update(width=None, height=None, stage=None, reason=None)
            if row["image"] is None:
                row.update(stage="read", reason="no image member in sample (expected one of .png/.jpg/.webp/...)")
            else:
                try:
                    h, w = decode_image(row["image"], max_pixels=self.max_pixels).size
                    row.update(width=w, height=h)
                except ImageError as err:
                    row.update(stage="decode", reason=str(err))
            if row["stage"]:
                row["image"] = None  # nothing downstream needs the bad bytes
            out.append(row)
        return pa.Table.from_pylist(out, schema=VALIDATED_SCHEMA)


def sample_prompt(row: dict) -> str | None:
    """The sample's own prompt: its JSON ``prompt``/``caption``, else its ``.txt`` member."""
    meta = sample_meta(row.get("meta")) or {}
    for name in ("prompt", "caption"):
        if isinstance(meta.get(name), str) and meta[name].strip():
            return meta[name]
    for name, data in zip(row.get("member_names") or [], row.get("member_data") or []):
        if name == "txt" and data:
            return data.decode("utf-8", errors="replace").strip() or None
    return None


class ProtectActor:
    """Callable class for `map_batches(compute=ActorPoolStrategy(...))`: loads the model once.

    `settings` holds model, revision, device, dtype, threads, max_pixels and config (a
    ProtectConfig as a dict). Images of any mix of sizes can share a batch: the engine groups
    them by working size internally.
    """

    def __init__(self, settings: dict):
        import torch

        from .models import load_ensemble
        from .protect import ProtectConfig, build_protector

        if settings.get("threads"):
            torch.set_num_threads(int(settings["threads"]))
        members = load_ensemble(settings["model"], device=settings.get("device", "auto"),  # "A,B": an ensemble
                                dtype=settings.get("dtype", "auto"), revision=settings.get("revision"),
                                low_memory=bool(settings.get("low_memory", False)))
        self.protector = build_protector(members, ProtectConfig(**settings["config"]))
        models = members[0]
        self.device = str(models.device)
        self.max_pixels = settings.get("max_pixels", DEFAULT_MAX_PIXELS)
        self.lpips = None
        weights = self.protector.config.extra.get("lpips_weights")
        if weights:  # LPIPS in protect_metrics only when it means something: calibrated weights
            from .lpips_net import build_lpips, lpips_distance

            net = build_lpips(weights, models.device)[0]
            self.lpips = lambda clean, protected: lpips_distance(net, clean, protected)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .protect.batch import protect_encoded

        rows = _rows(batch)
        for row in rows:
            row.update(out_ext=None, linf=None, psnr=None, ssim=None, lpips=None, seconds=None, device=None,
                       warnings=None)
        todo = [row for row in rows if not row["stage"]]
        if todo:
            results = protect_encoded(
                self.protector, [r["key"] for r in todo], [r["image"] for r in todo],
                prompts=[sample_prompt(r) for r in todo], max_pixels=self.max_pixels, lpips=self.lpips,
            )
            for row, res in zip(todo, results):
                if res.error:
                    row.update(image=None, stage=res.stage, reason=res.error)
                    continue
                m = res.metrics
                row.update(image=res.data, out_ext=res.ext, linf=m["linf"], psnr=m["psnr"], ssim=m["ssim"],
                           lpips=m.get("lpips"),
                           seconds=m["seconds"], device=self.device, warnings="; ".join(res.warnings) or None)
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def protected_meta(meta: str | None, params: dict) -> tuple[str, str | None]:
    """(json text for the output sample, name of the member holding it).

    The protection parameters go under a ``mimicshield`` field of the sample's JSON object.
    A sample without JSON gets one; a JSON member that is not an object is kept as it is and the
    parameters go into a separate ``mimicshield.json`` member instead.
    """
    if meta is None:
        return json.dumps({"mimicshield": params}), "json"
    value = sample_meta(meta)
    if value is None:
        return json.dumps({"mimicshield": params}), "mimicshield.json"
    value = dict(value)
    value["mimicshield"] = params
    return json.dumps(value, ensure_ascii=False), "json"
