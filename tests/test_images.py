"""Image codec round trip: format, mode, size, alpha and EXIF survive; bad bytes give a reason.

No model here: these tests exercise `pipeline.io.images` alone (decode -> perturb -> encode ->
decode again) with images built in memory by Pillow.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import image_file, png_16bit_rgb
from PIL import Image

from pipeline.io.images import (
    ImageError,
    apply_perturbation,
    decode_image,
    encode_image,
    extension_for,
    quantize_perturbation,
)
from pipeline.metrics.visibility import linf

pytestmark = pytest.mark.mutation  # fast: mutmut runs this module (README, "Tests")
ORIENTATION = 0x0112


def random_rgb(h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def random_delta(h: int, w: int, eps: float, seed: int = 1) -> np.ndarray:
    """A float perturbation filling the eps-ball, including its corners."""
    return np.random.default_rng(seed).uniform(-eps, eps, (h, w, 3)).astype(np.float32)


def exif_with_orientation(value: int = 6) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = value
    return exif.tobytes()


def roundtrip(data: bytes, eps: float = 8.0):
    """decode -> perturb within eps -> encode -> decode; returns (source, written bytes, reread)."""
    src = decode_image(data)
    h, w = src.size
    out = encode_image(src, apply_perturbation(src, random_delta(h, w, eps), eps))
    return src, out, decode_image(out)


# --------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("eps", [0.0, 1.0, 4.5, 16.0, 16.4, 255.0])
def test_quantize_never_exceeds_floor_eps(eps):
    delta = np.random.default_rng(0).uniform(-eps - 0.49, eps + 0.49, (64, 64, 3))
    q = quantize_perturbation(delta, eps)
    assert np.abs(q).max() <= int(np.floor(eps))


# --------------------------------------------------------------------------- lossless formats


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_lossless_roundtrip_keeps_format_mode_size_and_budget(fmt, mode):
    rgb = random_rgb()
    img = Image.fromarray(rgb)
    if mode != "RGB":
        img = img.convert(mode)
    if mode.endswith("A"):  # a real alpha channel (an all-opaque one may be dropped by encoders)
        img.putalpha(Image.fromarray(np.random.default_rng(3).integers(0, 256, rgb.shape[:2], dtype=np.uint8)))
    params = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    src, out, back = roundtrip(image_file(img, fmt, **params), eps=8.0)
    written = Image.open(io.BytesIO(out))
    assert written.format == fmt
    assert written.size == img.size
    expected_mode = {"WEBP": {"L": "RGB", "LA": "RGBA"}}.get(fmt, {}).get(mode, mode)
    # WebP has no grayscale mode: Pillow decodes a gray WebP as RGB(A), and that is what we keep.
    assert src.mode == expected_mode and written.mode == expected_mode
    assert linf(back.rgb, src.rgb) <= 8
    assert linf(back.rgb, src.rgb) > 0  # the perturbation really was written
    if src.alpha is not None:
        np.testing.assert_array_equal(back.alpha, src.alpha)  # alpha is never perturbed
    assert extension_for(src) == fmt.lower()


def test_png_16bit_grayscale_stays_16bit_within_budget():
    gray16 = np.random.default_rng(0).integers(0, 65536, (20, 30), dtype=np.uint16)
    data = image_file(Image.fromarray(gray16), "PNG")
    src, out, back = roundtrip(data, eps=4.5)
    assert src.mode.startswith("I") and src.output_mode == "I;16"
    written = Image.open(io.BytesIO(out))
    assert written.mode.startswith("I") and written.size == (30, 20)
    diff = np.abs(back.gray16.astype(np.int64) - gray16.astype(np.int64))
    assert diff.max() <= 4 * 257  # budget 4.5 -> 4 steps of 1/255 of the 16-bit range
    assert diff.max() > 0
    assert linf(back.rgb, src.rgb) <= 4


def test_png_16bit_rgb_is_flagged_and_written_as_8bit_within_budget():
    pixels = np.random.default_rng(0).integers(0, 65536, (20, 30, 3)).astype(np.uint16)
    src, out, back = roundtrip(png_16bit_rgb(pixels), eps=6.0)
    assert src.bits == 16 and src.gray16 is None  # Pillow decodes it to 8 bits per channel
    np.testing.assert_array_equal(src.rgb, (pixels >> 8).astype(np.uint8))
    written = Image.open(io.BytesIO(out))
    assert written.format == "PNG" and written.mode == "RGB" and written.size == (30, 20)
    assert 0 < linf(back.rgb, src.rgb) <= 6


def test_palette_with_transparency_becomes_rgba_with_alpha_kept():
    pal = Image.fromarray(random_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    src, out, back = roundtrip(image_file(pal, "PNG", transparency=0), eps=6.0)
    assert src.mode == "P" and src.alpha is not None and (src.alpha == 0).any()
    written = Image.open(io.BytesIO(out))
    assert written.mode == "RGBA" and written.format == "PNG" and written.size == pal.size
    np.testing.assert_array_equal(back.alpha, src.alpha)
    assert linf(back.rgb, src.rgb) <= 6


# --------------------------------------------------------------------------- JPEG, EXIF, CMYK


def test_jpeg_keeps_format_size_and_exif_orientation():
    rgb = random_rgb(32, 48)
    data = image_file(Image.fromarray(rgb), "JPEG", quality=95, subsampling=0, exif=exif_with_orientation(6))  # tables kept
    src, out, back = roundtrip(data, eps=8.0)
    written = Image.open(io.BytesIO(out))
    assert written.format == "JPEG" and written.mode == "RGB"
    assert written.size == (48, 32)  # stored size: pixels are never rotated
    assert written.getexif().get(ORIENTATION) == 6
    assert extension_for(src) == "jpg"
    # JPEG is lossy: the budget is not exact. Measured at quality 95, 4:4:4, on 100 uniform +-8 perturbations
    # of this image and of a photo: the codec moves a pixel by at most 22 from the intended value (mean <= 3.2),
    # and the written file is at most 8 + 18 from the source.
    intended = np.clip(src.rgb.astype(np.int64) + np.rint(random_delta(32, 48, 8.0)).astype(np.int64), 0, 255)
    codec_error = np.abs(back.rgb.astype(np.int64) - intended)
    assert codec_error.max() <= 22 and codec_error.mean() <= 4.0
    assert linf(back.rgb, src.rgb) <= 8 + 20


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_kept_in_lossless_formats(fmt):
    params = {"lossless": True} if fmt == "WEBP" else {}
    data = image_file(Image.fromarray(random_rgb()), fmt, exif=exif_with_orientation(3), **params)
    _, out, _ = roundtrip(data)
    assert Image.open(io.BytesIO(out)).getexif().get(ORIENTATION) == 3


def test_cmyk_jpeg_is_written_as_rgb_jpeg():
    cmyk = Image.fromarray(random_rgb()).convert("CMYK")
    src, out, _ = roundtrip(image_file(cmyk, "JPEG"))
    assert src.mode == "CMYK" and src.output_mode == "RGB"
    written = Image.open(io.BytesIO(out))
    assert written.format == "JPEG" and written.mode == "RGB" and written.size == cmyk.size


def test_icc_profile_kept():
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    _, out, _ = roundtrip(image_file(Image.fromarray(random_rgb()), "PNG", icc_profile=icc))
    assert Image.open(io.BytesIO(out)).info.get("icc_profile") == icc


def test_one_pixel_image_roundtrip():
    src, out, back = roundtrip(image_file(Image.fromarray(random_rgb(1, 1)), "PNG"), eps=8.0)
    assert Image.open(io.BytesIO(out)).size == (1, 1)
    assert linf(back.rgb, src.rgb) <= 8


def test_gif_is_written_as_png():
    gif = Image.fromarray(random_rgb()).convert("P")
    src, out, _ = roundtrip(image_file(gif, "GIF"))
    assert src.format == "GIF" and extension_for(src) == "png"
    assert Image.open(io.BytesIO(out)).format == "PNG"


# --------------------------------------------------------------------------- bad bytes


def test_truncated_png_is_an_error():
    data = image_file(Image.fromarray(random_rgb(64, 64)), "PNG")
    with pytest.raises(ImageError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty"), (b"\x00garbage bytes, not an image" * 10, "not an image")],
)
def test_non_images_are_errors_with_a_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


def test_too_many_pixels_refused_before_decoding():
    data = image_file(Image.fromarray(random_rgb(100, 100)), "PNG")
    with pytest.raises(ImageError, match="too large"):
        decode_image(data, max_pixels=5000)


def test_animated_gif_is_an_error():
    frames = [Image.fromarray(random_rgb(seed=s)).convert("P") for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="animated"):
        decode_image(buf.getvalue())


def test_perturbation_is_rounded_not_floored_or_truncated():
    rgb = np.full((2, 4, 3), 100, np.uint8)
    delta = np.array([0.4, 0.6, -0.4, -0.6, 1.49, -1.51, 2.7, -2.7], np.float32).reshape(2, 4, 1).repeat(3, axis=2)
    src = decode_image(image_file(Image.fromarray(rgb), "PNG"))
    written = decode_image(encode_image(src, apply_perturbation(src, delta, 8.0))).rgb.astype(int)
    np.testing.assert_array_equal(written[..., 0].ravel() - 100, [0, 1, 0, -1, 1, -2, 3, -3])
    np.testing.assert_array_equal(quantize_perturbation(delta, 2.0)[..., 0].ravel(), [0, 1, 0, -1, 1, -2, 2, -2])


def test_png_level_changes_the_size_never_the_pixels_and_finish_measures_what_was_written():
    from skimage import data

    from pipeline.io.images import apply_perturbation, decode_image, encode_image
    from pipeline.io.sample_data import png_bytes
    from pipeline.protect.encoded import finish

    image = decode_image(png_bytes(data.astronaut()[:128, :160]))
    delta = np.random.default_rng(0).integers(-8, 9, image.rgb.shape).astype(np.float32)
    pixels = apply_perturbation(image, delta, 8)
    files = {level: encode_image(image, pixels, png_level=level) for level in (0, 3, 9)}
    assert all(np.array_equal(decode_image(f).rgb, pixels) for f in files.values())
    assert len(files[9]) < len(files[3]) < len(files[0])
    # finish skips decoding a lossless RGB file again: its figures must be those of the decoded file
    done = finish("k", image, delta, 8, png_level=9)
    written = decode_image(done.data).rgb
    assert done.data == files[9] and done.metrics["linf"] == np.abs(written.astype(int) - image.rgb).max() == 8
