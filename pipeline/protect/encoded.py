"""Protect encoded images: bytes in, bytes out, as three per-sample steps the pipeline's stages share.

    decode(data, max_pixels)              -> DecodedImage     CPU: size checked on the header, decoded once
    protector.protect(rgbs, keys, ...)    -> float deltas     accelerator: tensor work only
    finish(image, delta, eps, lpips)      -> ProtectResult    CPU: quantise, encode in the source format, measure
                                                              (a JPEG keeps its own coefficients: io/jpeg.py)

`protect_encoded(protector, keys, datas)` chains the three for one batch in one process (the
Python API, tests, benchmarks). The Ray pipeline runs each step in its own stage (stages.py) with
these same functions, so both give the same bytes. Nothing here raises for a bad image: each input
yields exactly one `ProtectResult`, written or failed, so every sample is accounted for.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, replace

import numpy as np

from pipeline.io.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_PNG_LEVEL,
    LOSSLESS_FORMATS,
    DecodedImage,
    ImageError,
    apply_perturbation,
    decode_image,
    encode_image,
    extension_for,
    quantize_perturbation,
)
from pipeline.io.jpeg import encode_within_budget
from pipeline.metrics.base import Metric
from pipeline.metrics.visibility import PSNR, SSIM, Linf

JPEG_KEPT = "JPEG output keeps {:.0%} of the perturbation (L2) through the source's quantisation"  # the run sums them


def jpeg_kept_share(warning: str) -> float | None:
    """The share a JPEG_KEPT warning reports (0-1), or None for any other warning."""
    found = re.match(r"JPEG output keeps (\d+)% ", warning)
    return int(found.group(1)) / 100 if found else None


VISIBILITY = (Linf(), PSNR(), SSIM())  # the written file against the clean image (and LPIPS with calibrated weights)


@dataclass
class ProtectResult:
    key: str
    data: bytes | None = None  # the protected, encoded image; None on error
    ext: str | None = None  # file extension / WebDataset member suffix of `data`
    metrics: dict = field(default_factory=dict)  # linf, psnr, ssim, [lpips], seconds, width, height
    error: str | None = None  # reason, when the sample could not be protected
    stage: str | None = None  # "decode", "protect" or "encode" for errors
    warnings: list[str] = field(default_factory=list)


def decode(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """The one decode of a sample's image (raises `ImageError` with the reason)."""
    if data is None:
        raise ImageError("no image member in sample (expected one of .png/.jpg/.webp/...)")
    return decode_image(data, max_pixels=max_pixels)


def quantize(delta: np.ndarray, eps: float) -> np.ndarray:
    """A protector's float perturbation as the int16 one that is written (|q| <= floor(eps))."""
    return quantize_perturbation(delta, eps)


def finish(
    key: str,
    image: DecodedImage,
    delta: np.ndarray,
    eps: float,
    seconds: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    lpips: Metric | None = None,
    jpeg_as: str = "jpeg",
    png_level: int = DEFAULT_PNG_LEVEL,
) -> ProtectResult:
    """Apply `delta` (pixel units, float or the int16 of `quantize`), encode, measure the written file.

    JPEG sources are written as JPEG (`jpeg_as="jpeg"`): the source's own quantised coefficients plus the
    perturbation's, backed off block by block until every decoded pixel is within eps (io/jpeg.py), so the file
    keeps its tables, subsampling and size and the budget holds exactly; a JPEG whose coefficients cannot carry
    it (CMYK, ...) is written as PNG, with a warning. `jpeg_as="png"` writes every JPEG source as PNG (the whole
    perturbation, none of it quantised away). The L-inf reported is the written file's.
    """
    res = ProtectResult(key=key)
    if jpeg_as == "png" and image.format == "JPEG":
        image = as_png(image)
    try:
        pixels = apply_perturbation(image, delta, eps)
        res.data, res.ext, written = None, extension_for(image), None
        if image.format == "JPEG" and image.jpeg_source is not None:
            res.data, written, kept, why_not = _encode_jpeg(image, pixels, eps)  # written: already decoded there
            if res.data is None:
                image = as_png(image)
                res.ext = extension_for(image)
                res.warnings.append(f"JPEG written as PNG ({why_not}): the budget holds exactly")
            elif kept is not None:
                res.warnings.append(JPEG_KEPT.format(kept))
        if res.data is None:
            res.data = encode_image(image, pixels, png_level=png_level)
            if image.format in LOSSLESS_FORMATS and image.output_mode == "RGB" and pixels.dtype == np.uint8:
                written = pixels  # a lossless RGB file holds exactly these pixels (never rotated): no second decode
            else:  # other modes (grey, alpha, 16-bit) are measured on what the file decodes to
                written = decode_image(res.data, max_pixels=max_pixels).rgb
    except Exception as err:
        res.data, res.error, res.stage = None, f"{type(err).__name__}: {err}", "encode"
        return res
    h, w = image.size
    res.metrics = {m.name: m([written], [image.rgb]) for m in VISIBILITY}
    res.metrics.update(seconds=seconds, width=w, height=h)
    if lpips is not None:
        res.metrics[lpips.name] = lpips([written], [image.rgb])
    if res.metrics["linf"] > math.floor(eps + 1e-6):
        res.warnings.append(f"written L-inf {res.metrics['linf']:g} exceeds the budget {eps:g} after compression")
    if image.output_mode != image.mode:
        res.warnings.append(f"mode {image.mode} written as {image.output_mode}")
    if image.bits == 16 and image.gray16 is None:
        res.warnings.append("16-bit colour written as 8-bit (decoded to 8 bits per channel)")
    return res


def as_png(image: DecodedImage) -> DecodedImage:
    return replace(image, format="PNG", jpeg_qtables=None, jpeg_subsampling=None, jpeg_source=None)


def _encode_jpeg(image: DecodedImage, pixels: np.ndarray, eps: float):
    """(the JPEG within budget, its decoded RGB pixels, the share of the perturbation's L2 it kept (None: there was
    none), None), or (None, None, None, why not)."""
    grey = pixels.ndim == 2
    clean = image.rgb[..., 0] if grey else image.rgb  # a grey JPEG decodes to R = G = B
    intended = pixels.astype(np.int16) - clean
    try:
        data, written = encode_within_budget(image.jpeg_source, clean, intended, eps)
    except Exception as err:  # CMYK, 12-bit, arithmetic coding, a coefficient reader that fails: PNG
        return None, None, None, f"{type(err).__name__}: {err}"
    norm = float(np.linalg.norm(intended))
    kept = float(np.linalg.norm(written.astype(np.int16) - clean)) / norm if norm else None
    rgb = np.repeat(written[..., None], 3, axis=2) if grey else written  # as decode_image gives a grey JPEG
    return data, rgb, kept, None


def protect_encoded(
    protector,
    keys: list[str],
    datas: list[bytes],
    prompts: list[str | None] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    lpips: Metric | None = None,
    jpeg_as: str = "jpeg",
    png_level: int = DEFAULT_PNG_LEVEL,
) -> list[ProtectResult]:
    """Decode, protect, re-encode and measure a batch; one result per input, in order.

    `protector` is what `pipeline.protect.build_protector` returns. `lpips` (a `pipeline.metrics.LPIPS`) adds an
    ``lpips`` measurement (pass one only with calibrated weights).
    """
    results = [ProtectResult(key=k) for k in keys]
    prompts = prompts or [None] * len(keys)
    decoded: dict[int, DecodedImage] = {}
    for i, data in enumerate(datas):
        try:
            decoded[i] = decode(data, max_pixels=max_pixels)
        except ImageError as err:
            results[i].error, results[i].stage = str(err), "decode"
    if not decoded:
        return results
    idx = list(decoded)
    start = time.perf_counter()
    try:
        deltas = protector.protect(
            [decoded[i].rgb for i in idx], keys=[keys[i] for i in idx], prompts=[prompts[i] for i in idx]
        )
    except Exception as err:  # e.g. out of memory on one huge image: fail the batch's rows, not the job
        for i in idx:
            results[i].error, results[i].stage = f"{type(err).__name__}: {err}", "protect"
        return results
    seconds_each = (time.perf_counter() - start) / len(idx)
    eps = protector.config.eps
    for i, delta in zip(idx, deltas):
        results[i] = finish(keys[i], decoded[i], quantize(delta, eps), eps, seconds_each, max_pixels, lpips,
                            jpeg_as, png_level)
    return results


def perturbation_preview(delta: np.ndarray, eps: float) -> np.ndarray:
    """The perturbation amplified to the full range, as uint8 (for reports)."""
    scale = 127.5 / max(eps, 1e-6)
    return np.clip(delta * scale + 127.5, 0, 255).astype(np.uint8)
