"""`noise:SIGMA`: additive Gaussian noise, sigma in [0, 1] pixel units, clipped and rounded.

Source: Hönig et al., "Adversarial perturbations cannot reliably protect artists from generative
AI" (ICLR 2025), Gaussian noising with sigma = 0.05. The noise is seeded per (seed, key), so a
protected image and its clean original get the same noise.
"""

from __future__ import annotations

import numpy as np

from pipeline.study.purify.base import Purification


class GaussianNoise(Purification):
    name = "noise"

    def check(self):
        if self.param < 0:
            raise ValueError(f"noise:SIGMA needs sigma >= 0, got {self.param:g}")

    def one(self, rgb, seed, context):
        noise = np.random.default_rng(seed).normal(0.0, self.param * 255.0, rgb.shape)
        return np.clip(np.round(rgb.astype(np.float64) + noise), 0, 255).astype(np.uint8)


UNIT = GaussianNoise
