"""Decode, validate and re-encode images without losing what makes them the same file.

Protection works on an RGB uint8 view of the image. Encoding puts the perturbation back into
the image's own mode (RGB, RGBA, L, LA, 16-bit grayscale), format (PNG, JPEG, WebP, ...),
size, EXIF (so orientation is kept: pixels are never rotated) and ICC profile.

Bad input raises `ImageError` with a short reason; callers turn it into an error row.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image
Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit below, before decoding

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; larger is refused before decoding
WRITABLE_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "TIFF"}
LOSSLESS_FORMATS = {"PNG", "WEBP", "BMP", "TIFF"}  # as written here (WebP lossless, TIFF uncompressed)
# zlib level of written PNGs (--png-level): 3 writes 7% larger files than Pillow's 6 in a third to a half of the time at
# 512-2048 px (benchmarks/bench_cpu_stages.py); the pixels are the same at every level
DEFAULT_PNG_LEVEL = 3
LOSSY_FORMATS = {"JPEG"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's "L"


class ImageError(ValueError):
    """An input that cannot be protected. str(err) is the reason for the errors table."""


@dataclass
class DecodedImage:
    rgb: np.ndarray  # H x W x 3 uint8: the pixels protection sees
    format: str  # PNG, JPEG, WEBP, ...
    mode: str  # the source mode (RGB, RGBA, L, LA, P, I;16, CMYK, ...)
    alpha: np.ndarray | None = None  # H x W uint8, kept unchanged
    gray16: np.ndarray | None = None  # H x W uint16 source pixels of 16-bit grayscale images
    exif: bytes | None = None
    icc_profile: bytes | None = None
    bits: int = 8  # bits per sample in the file; Pillow decodes 16-bit RGB(A) PNGs to 8 bits
    jpeg_qtables: dict | None = None  # JPEG sources: quantisation tables {index: 64 values}, written back
    jpeg_subsampling: int | None = None  # JPEG sources: 0 (4:4:4), 1 (4:2:2), 2 (4:2:0); None: unknown
    jpeg_source: bytes | None = None  # JPEG sources: the file itself, whose coefficients the output keeps (io/jpeg.py)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.rgb.shape[0], self.rgb.shape[1]

    @property
    def output_mode(self) -> str:
        """The mode written back: the source mode where the format can hold a perturbation."""
        if self.gray16 is not None:
            return "I;16"
        if self.mode in ("RGB", "L") and self.alpha is not None:
            return self.mode + "A"  # a tRNS colour key: kept as an alpha channel (perturbed pixels break the key)
        if self.mode in ("RGB", "RGBA", "L", "LA"):
            return self.mode
        return "RGBA" if self.alpha is not None else "RGB"  # P, CMYK, ... become RGB(A)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode image bytes into a `DecodedImage`, or raise `ImageError` with the reason."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image (format not recognised)") from None
    except Exception as err:
        raise ImageError(f"cannot open image: {err}") from None
    width, height = img.size
    if width * height > max_pixels:  # header only so far: a decompression bomb stops here
        raise ImageError(f"too large: {width}x{height} = {width * height} pixels > limit {max_pixels}")
    if getattr(img, "n_frames", 1) > 1:
        raise ImageError(f"animated {img.format} ({img.n_frames} frames) is not supported")
    fmt = img.format or "PNG"
    raw = img.tile[0][3] if img.tile else None  # the decoder's raw mode, e.g. "RGB;16B"
    bits = 16 if isinstance(raw, str) and ";16" in raw else 8
    try:
        img.load()
    except Exception as err:
        raise ImageError(f"corrupt or truncated {fmt}: {err}") from None

    mode = img.mode
    alpha = gray16 = None
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        gray16 = np.clip(np.asarray(img, dtype=np.int64), 0, 65535).astype(np.uint16)
        gray8 = np.rint(gray16 / 257.0).astype(np.uint8)
        rgb = np.repeat(gray8[..., None], 3, axis=2)
    else:
        has_alpha = mode in ("RGBA", "LA", "PA") or (mode in ("P", "RGB", "L") and "transparency" in img.info)
        if has_alpha:
            rgba = img.convert("RGBA")
            alpha = np.asarray(rgba)[..., 3].copy()
            rgb = np.asarray(rgba.convert("RGB"))
        else:
            rgb = np.asarray(img.convert("RGB"))
    qtables = subsampling = None
    if fmt == "JPEG":
        from PIL import JpegImagePlugin

        qtables = {int(k): list(v) for k, v in (getattr(img, "quantization", None) or {}).items()} or None
        sampling = JpegImagePlugin.get_sampling(img)
        subsampling = sampling if sampling in (0, 1, 2) else None
    return DecodedImage(
        rgb=np.ascontiguousarray(rgb, dtype=np.uint8),
        format=fmt,
        mode=mode,
        alpha=alpha,
        gray16=gray16,
        exif=img.info.get("exif"),
        icc_profile=img.info.get("icc_profile") if mode != "CMYK" else None,
        bits=bits,
        jpeg_qtables=qtables,
        jpeg_subsampling=subsampling,
        jpeg_source=data if fmt == "JPEG" else None,
    )


def quantize_perturbation(delta: np.ndarray, eps: float) -> np.ndarray:
    """Round a float perturbation (pixel units) to integers that stay within the budget.

    Rounding, not truncation: |round(delta)| <= floor(eps) holds for every pixel, so the
    budget holds exactly on the written file.
    """
    bound = math.floor(eps + 1e-6)
    return np.clip(np.rint(delta), -bound, bound).astype(np.int16)


def apply_perturbation(image: DecodedImage, delta: np.ndarray, eps: float) -> np.ndarray:
    """The protected pixels in the output mode, as an array ready for PIL.

    `delta` is H x W x 3 float in [0, 255] units (protected - original on the RGB view).
    """
    if image.gray16 is not None or image.output_mode in ("L", "LA"):
        delta_gray = delta.astype(np.float32) @ _LUMA  # convex weights: still within eps
        if image.gray16 is not None:
            step = quantize_perturbation(delta_gray, eps).astype(np.int64) * 257
            return np.clip(image.gray16.astype(np.int64) + step, 0, 65535).astype(np.uint16)
        gray = np.asarray(Image.fromarray(image.rgb).convert("L"), dtype=np.int16)
        out = np.clip(gray + quantize_perturbation(delta_gray, eps), 0, 255).astype(np.uint8)
        return out if image.alpha is None else np.dstack([out, image.alpha])
    rgb = np.clip(image.rgb.astype(np.int16) + quantize_perturbation(delta, eps), 0, 255).astype(np.uint8)
    return rgb if image.alpha is None else np.dstack([rgb, image.alpha])


def encode_image(image: DecodedImage, pixels: np.ndarray, jpeg_quality: int = 95,
                 png_level: int = DEFAULT_PNG_LEVEL) -> bytes:
    """Encode output pixels in the source format with its EXIF and ICC profile.

    JPEG: the source's quantisation tables and subsampling are kept (its quality, as Pillow's
    ``quality="keep"``); `jpeg_quality` only when they are unknown.
    """
    mode = image.output_mode
    if mode == "I;16":
        out = Image.fromarray(pixels.astype(np.uint16))
    else:
        out = Image.fromarray(pixels, mode=None)
    fmt = image.format if image.format in WRITABLE_FORMATS else "PNG"
    if fmt == "JPEG" and out.mode in ("RGBA", "LA"):
        fmt = "PNG"  # JPEG has no alpha; never happens for real JPEG sources
    params: dict = {}
    if image.exif:
        params["exif"] = image.exif
    if image.icc_profile:
        params["icc_profile"] = image.icc_profile
    if fmt == "JPEG" and image.jpeg_qtables:
        # the source's own tables and subsampling (what quality="keep" does for a JPEG Pillow opened)
        tables = [image.jpeg_qtables[k] for k in sorted(image.jpeg_qtables)]
        params.update(qtables=tables, subsampling=0 if image.jpeg_subsampling is None else image.jpeg_subsampling)
    elif fmt == "JPEG":
        params.update(quality=jpeg_quality, subsampling=0)
    elif fmt == "WEBP":
        params.update(lossless=True, exact=True)  # lossless keeps the budget exact
    elif fmt == "PNG":
        params.update(compress_level=png_level)
    buf = io.BytesIO()
    out.save(buf, format=fmt, **params)
    return buf.getvalue()


def extension_for(image: DecodedImage) -> str:
    fmt = image.format if image.format in WRITABLE_FORMATS else "PNG"
    return {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())


# ---------------------------------------------------------------- image <-> tensor, and resizing
#
# One convention each, named by purpose:
#   to_tensor / to_uint8     uint8 H x W x 3  <->  float 1 x 3 x H x W in [0, 1]  (rounded, clipped back)
#   to_batch / from_batch    a list of them   <->  N x 3 x H x W: float in [0, 1] ("unit"), in [-1, 1] ("signed": what
#                            the VAEs take and give), or uint8 unscaled ("uint8": the metrics' own 0-255 scales)
#   resize_pixels            images fed to a model at another size: bilinear, antialiased (torch), as the
#                            protection engine, FastProtect and the built-in training see them
#   resize_perturbation      perturbations mapped back to the image: bilinear, no antialiasing (a convex
#                            combination of values in the eps-ball stays in it)
#   resize_image             uint8 images for a mimic or a metric: PIL bicubic (diffusers' and the
#                            evaluation references' own transforms)
#   center_crop_resize       what a fine-tuning script feeds its model: the shorter side resized to
#                            `size`, then the centre size x size (diffusers' Resize(size) + CenterCrop(size));
#                            the evaluation's mimics and the references they are compared with


def to_tensor(rgb: np.ndarray, device=None):
    """uint8 H x W x 3 -> float32 1 x 3 x H x W in [0, 1] (a copy: decoded arrays are read-only)."""
    return to_batch([rgb], device=device)


def to_batch(images: list[np.ndarray], scale: str = "unit", device=None):
    """uint8 H x W x 3 images of one size -> N x 3 x H x W (a copy: decoded arrays are read-only), `scale`:

        "unit"     float32 in [0, 1], x / 255
        "signed"   float32 in [-1, 1], x / 127.5 - 1: the range the VAEs encode
        "uint8"    uint8, unscaled (the metrics' own scales: 0-255 for PSNR/SSIM and FID/KID); a channels-first
                   view of one stacked copy (call `.contiguous()` where a model's numbers were fixed on it)
    """
    import torch

    stacked = np.stack([np.asarray(img, dtype=np.uint8) for img in images])
    if scale == "signed":
        x = torch.from_numpy(stacked.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
    elif scale == "unit":
        x = torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div(255)
    elif scale == "uint8":
        x = torch.from_numpy(stacked).permute(0, 3, 1, 2)
    else:
        raise ValueError(f"scale must be unit, signed or uint8, got {scale!r}")
    return x if device is None else x.to(device)


def to_uint8(x) -> np.ndarray:
    """float 1 x 3 x H x W (or 3 x H x W) in [0, 1] -> uint8 H x W x 3, rounded and clipped."""
    return from_batch(x if x.dim() == 4 else x[None])[0]


def from_batch(x, signed: bool = False) -> list[np.ndarray]:
    """float N x 3 x H x W in [0, 1] (or [-1, 1]: `signed`), or N x H x W x 3 numpy in [0, 1] (a diffusers
    pipeline's ``output_type="np"``) -> uint8 H x W x 3 arrays, clipped and rounded (half to even)."""
    import torch

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x).permute(0, 3, 1, 2)
    x = x.detach().float()
    if signed:
        x = (x.clamp(-1, 1) + 1) / 2
    x = x.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(x)


def resize_pixels(x, size: tuple[int, int]):
    """Images (B x C x H x W float) to `size` (h, w) as a model sees them: bilinear, antialiased."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)


def resize_perturbation(d, size: tuple[int, int]):
    """A perturbation (B x C x h x w) to `size`: bilinear without antialiasing, so it stays in its eps-ball."""
    import torch.nn.functional as F

    if tuple(d.shape[-2:]) == tuple(size):
        return d
    return F.interpolate(d, size=tuple(size), mode="bilinear", align_corners=False)


def center_crop_resize(rgb: np.ndarray, size: int, resample=Image.BICUBIC) -> np.ndarray:
    """uint8 H x W (x C) -> size x size: the shorter side resized to `size`, then the centre crop (aspect kept).

    What the diffusers training scripts do (``Resize(size)`` + ``CenterCrop(size)``); `resample`
    NEAREST for masks. A square image is only resized, as before.
    """
    h, w = rgb.shape[:2]
    if h == w:
        return rgb if h == size else np.asarray(Image.fromarray(rgb).resize((size, size), resample))
    scale = size / min(h, w)
    rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = np.asarray(Image.fromarray(rgb).resize((rw, rh), resample))
    top, left = (rh - size) // 2, (rw - size) // 2
    return resized[top : top + size, left : left + size]


def resize_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 H x W x 3 to `size` (h, w) with PIL bicubic; unchanged when already that size."""
    h, w = size
    if rgb.shape[0] == h and rgb.shape[1] == w:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BICUBIC))
