"""JPEG output whose decoded pixels stay within the budget of the source's, every pixel, exactly.

Why not encode the protected pixels with the source's tables: re-encoding decoded pixels is not idempotent. With
no perturbation at all, re-encoding a q75 4:2:0 photo moved pixels by up to 17 levels and a q95 4:2:2 one by 24
(saturated colours through chroma subsampling), and a full-budget perturbation came back at 2-3x eps.

So the written file keeps the source's own quantised DCT coefficients (read losslessly with libjpeg through
`jpeglib`) and the perturbation is added to them:

    dYCC   = M d                            d: the perturbation in RGB (or grey) pixels; M: JFIF's RGB -> YCbCr
    dCoef  = round(DCT_8x8(down(dYCC)) / Q)  down: box average to each component's sampling; Q: the source's tables
    C'     = C + dCoef                       written with the source's tables, sampling and markers (EXIF, ICC)

then the written file is decoded (as any reader would: libjpeg through Pillow) and every 8x8 block that holds a
pixel outside the eps-ball, with the chroma blocks next to it (upsampling reads neighbours), is backed off: its
target halved, then zeroed. A block whose coefficients are the source's decodes to the source's exact pixels, so
the loop always ends within budget; most images need one or two decodes.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image

# JFIF (ITU-T T.871) RGB -> YCbCr, without the +128 offsets (a perturbation is a difference)
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_N = np.arange(8)
_DCT = np.sqrt(2 / 8) * np.cos((2 * _N[None, :] + 1) * _N[:, None] * np.pi / 16)  # JPEG's 8-point DCT-II
_DCT[0] /= np.sqrt(2)  # orthonormal: F = A f A^T is JPEG's F(v, u) = C(u)C(v)/4 sum f(y, x) cos cos
HALVINGS = 3  # back-off steps of a block's target before it is zeroed
MAX_ROUNDS = 12  # decodes before giving up on the perturbation (never reached in practice; the source is kept)


class JpegCoefficientsError(ValueError):
    """The source's coefficients cannot carry the perturbation (CMYK, 12-bit, arithmetic coding, ...)."""


def _blocks(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """An H x W plane as rows x cols x 8 x 8 blocks (zero-padded to the coefficient grid)."""
    pad = np.zeros((rows * 8, cols * 8))
    h, w = min(x.shape[0], rows * 8), min(x.shape[1], cols * 8)
    pad[:h, :w] = x[:h, :w]
    return pad.reshape(rows, 8, cols, 8).transpose(0, 2, 1, 3)


def _downsample(x: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """Box average over fy x fy blocks (libjpeg's h2v2/h2v1 downsampling), edges replicated."""
    if fy == fx == 1:
        return x
    h, w = x.shape
    x = np.pad(x, ((0, -h % fy), (0, -w % fx)), mode="edge")
    return x.reshape(x.shape[0] // fy, fy, x.shape[1] // fx, fx).mean(axis=(1, 3))


def _read(path: str):
    import jpeglib

    jpeg = jpeglib.read_dct(path)
    space = str(jpeg.jpeg_color_space)
    if not (space.endswith("YCbCr") and jpeg.num_components == 3) and not (
        space.endswith("GRAYSCALE") and jpeg.num_components == 1
    ):
        raise JpegCoefficientsError(f"JPEG colour space {space} with {jpeg.num_components} components")
    jpeg.load()
    return jpeg


def _coefficient_targets(jpeg, delta: np.ndarray) -> list[np.ndarray]:
    """The perturbation as float coefficient changes (in quantisation steps), one array per component."""
    planes = [delta] if delta.ndim == 2 else list(np.einsum("ij,hwj->ihw", _RGB_TO_YCC, delta))
    samp = np.asarray(jpeg.samp_factor).reshape(-1, 2)  # (v, h) per component
    vmax, hmax = samp[:, 0].max(), samp[:, 1].max()
    components = [jpeg.Y] if len(planes) == 1 else [jpeg.Y, jpeg.Cb, jpeg.Cr]
    targets = []
    for c, (plane, coef) in enumerate(zip(planes, components)):
        v, h = samp[c]
        sub = _downsample(plane, int(vmax // v), int(hmax // h))
        blocks = _blocks(sub, coef.shape[0], coef.shape[1])
        table = np.asarray(jpeg.qt)[jpeg.quant_tbl_no[c]]
        targets.append(np.einsum("ij,rcjk,lk->rcil", _DCT, blocks, _DCT) / table)
    return targets


def _violating_blocks(outside: np.ndarray, jpeg, component: int, shape: tuple[int, int]) -> np.ndarray:
    """Which blocks of `component` can move the pixels in `outside` (H x W bool): the blocks that hold them,
    and, for subsampled chroma, the blocks next to those (fancy upsampling reads the neighbouring samples)."""
    samp = np.asarray(jpeg.samp_factor).reshape(-1, 2)
    vmax, hmax = samp[:, 0].max(), samp[:, 1].max()
    fy, fx = int(vmax // samp[component, 0]) * 8, int(hmax // samp[component, 1]) * 8
    ys, xs = np.nonzero(outside)
    mask = np.zeros(shape, dtype=bool)
    mask[np.minimum(ys // fy, shape[0] - 1), np.minimum(xs // fx, shape[1] - 1)] = True
    if fy > 8 or fx > 8:  # subsampled chroma: fancy upsampling reads the neighbouring samples
        padded, (h, w) = np.pad(mask, 1), shape
        mask = np.zeros(shape, dtype=bool)
        for dy in range(3):
            for dx in range(3):
                mask |= padded[dy : dy + h, dx : dx + w]
    return mask


def _one_jfif_header(data: bytes) -> bytes:
    """libjpeg writes a JFIF header of its own before the source's markers: keep the source's (its density)."""
    def app0_at(i: int) -> int:  # length of a JFIF APP0 segment at i, or 0
        if data[i : i + 2] != b"\xff\xe0" or data[i + 4 : i + 9] != b"JFIF\x00":
            return 0
        return 2 + int.from_bytes(data[i + 2 : i + 4], "big")

    first = app0_at(2)
    return data[:2] + data[2 + first :] if first and app0_at(2 + first) else data


def encode_within_budget(source: bytes, clean: np.ndarray, delta: np.ndarray, eps: float,
                         decodes: list[int] | None = None) -> tuple[bytes, np.ndarray]:
    """The source JPEG with `delta` added to its coefficients, every decoded pixel within `eps` of `clean`.

    `clean` is the source decoded (H x W x 3 RGB, or H x W grey for a greyscale JPEG), `delta` the integer
    perturbation of the same shape. Returns (the written bytes, their decoded pixels, as `clean`); `decodes`, when
    given, gets the number of encode-measure rounds appended. Raises `JpegCoefficientsError` for JPEGs whose
    coefficients cannot carry it (the caller writes PNG instead).
    """
    import jpeglib  # noqa: F401  (a clear ImportError here, before any work)

    bound = np.floor(eps + 1e-6)
    clean = clean.astype(np.int16)
    with tempfile.TemporaryDirectory(prefix="mimicshield-jpeg-") as tmp:
        src_path, out_path = os.path.join(tmp, "source.jpg"), os.path.join(tmp, "written.jpg")
        with open(src_path, "wb") as f:
            f.write(source)
        jpeg = _read(src_path)
        if (clean.ndim == 2) != (jpeg.num_components == 1):
            raise JpegCoefficientsError("pixels and JPEG components disagree (grey vs colour)")
        components = [jpeg.Y] if jpeg.num_components == 1 else [jpeg.Y, jpeg.Cb, jpeg.Cr]
        originals = [c.copy() for c in components]
        targets = _coefficient_targets(jpeg, delta.astype(np.float64))
        scale = [np.ones(t.shape[:2]) for t in targets]  # per block: 1, 1/2, 1/4, ..., then 0
        for rounds in range(1, MAX_ROUNDS + 1):
            for c, (orig, target) in enumerate(zip(originals, targets)):
                step = np.rint(target * scale[c][..., None, None])
                components[c][...] = np.clip(orig.astype(np.int32) + step, -1023, 1023).astype(orig.dtype)
            jpeg.write_dct(out_path, flags=["+OPTIMIZE_CODING"])  # optimal Huffman tables: the smallest file
            with Image.open(out_path) as img:
                written = np.asarray(img.convert("L" if clean.ndim == 2 else "RGB"), dtype=np.int16)
            outside = np.abs(written - clean) > bound
            if outside.ndim == 3:
                outside = outside.any(axis=2)
            if not outside.any():
                if decodes is not None:
                    decodes.append(rounds)
                with open(out_path, "rb") as f:
                    return _one_jfif_header(f.read()), written.astype(np.uint8)
            for c in range(len(components)):
                hit = _violating_blocks(outside, jpeg, c, scale[c].shape)
                scale[c][hit] = np.where(scale[c][hit] > 0.5 ** HALVINGS, scale[c][hit] / 2, 0.0)
    if decodes is not None:
        decodes.append(MAX_ROUNDS)
    return source, clean.astype(np.uint8)  # not reached in practice: the source itself is within any budget
