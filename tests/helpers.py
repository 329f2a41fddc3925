"""Helpers the tests share (one copy each). Where a test checks the code against an independent
derivation, the derivation lives here, written from the VAE and scheduler alone, never through
pipeline code."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SMALL_SIZE = 32  # small enough for a fast suite on 2 CPU cores; the tiny models work at any multiple of 16
SMALL_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def small_photos(size: int = SMALL_SIZE, names=SMALL_PHOTOS) -> list[np.ndarray]:
    """Real photos (scikit-image), the top-left square of each resized to size x size, uint8 RGB."""
    from skimage import data

    out = []
    for name in names:
        img = Image.fromarray(getattr(data, name)())
        side = min(img.size)
        img = img.crop((0, 0, side, side)).resize((size, size), Image.Resampling.LANCZOS)
        out.append(np.asarray(img.convert("RGB")))
    return out


def to_x01(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 H x W x 3 images -> float B x 3 x H x W in [0, 1] (written here, not through pipeline.io.images)."""
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])


def independent_encode(models, x01: torch.Tensor) -> torch.Tensor:
    """z = s * E(x), written here from the VAE alone (not through pipeline.protect.methods)."""
    return models.vae.encode(x01 * 2 - 1).latent_dist.mean * models.vae.config.scaling_factor
