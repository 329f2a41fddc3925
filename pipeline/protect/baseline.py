"""What a protection is measured against, for the benchmarks and the tests that check efficacy.

- `uniform_noise`: the baseline perturbation, uniform noise filling the same L-inf budget (pixel units);
- `apply_deltas`: uint8 images with a float perturbation added, clip(round(x + delta)), the pixels a
  perturbation gives once written.
"""

from __future__ import annotations

import numpy as np


def uniform_noise(images: list[np.ndarray], eps: float, seed: int) -> list[np.ndarray]:
    """One float32 perturbation per image, each pixel uniform in [-eps, eps], from one seeded generator."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(-eps, eps, im.shape).astype(np.float32) for im in images]


def apply_deltas(images: list[np.ndarray], deltas: list[np.ndarray]) -> list[np.ndarray]:
    """Protected uint8 images: clip(round(x + delta)) per image."""
    return [np.clip(np.round(im.astype(np.float32) + d), 0, 255).astype(np.uint8) for im, d in zip(images, deltas)]
