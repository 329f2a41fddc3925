"""Target images y for the textural loss L_tex = ||E(x) - E(y)||^2.

The reference code uses a high-frequency pattern image. Ours is generated (no file to ship):
a deterministic mix of fine stripes, a checkerboard and concentric rings in saturated colours.
A user may pass any image file instead (`--target path.png`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def high_frequency_pattern(size: int = 512, period: int = 8) -> np.ndarray:
    """size x size x 3 uint8 pattern with strong energy at high spatial frequencies."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    checker = ((xx // period + yy // period) % 2) * 2 - 1
    stripes = np.sin(2 * np.pi * (xx + 0.5 * yy) / (period / 2))
    rings = np.sin(2 * np.pi * np.hypot(xx - size / 2, yy - size / 2) / (period * 0.75))
    channels = [checker * 0.6 + stripes * 0.4, stripes * 0.6 + rings * 0.4, rings * 0.6 - checker * 0.4]
    img = np.stack(channels, axis=-1)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).round().astype(np.uint8)


def load_target(path: str | None) -> np.ndarray:
    """The target as uint8 H x W x 3: a user file, or the built-in pattern when `path` is None."""
    if path is None:
        return high_frequency_pattern()
    if not Path(path).is_file():
        raise FileNotFoundError(f"target image not found: {path}")
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))
