"""Visibility of a change: L-inf, PSNR and SSIM of an image against a reference (uint8 H x W x 3 arrays).

The metric classes (`Linf`, `PSNR`, `SSIM`: pipeline.metrics.base) are what the pipeline calls; the functions
below are their per-image kernels (torchmetrics' functional forms), ``f(reference, image)``.
PSNR and SSIM come from torchmetrics; identical images give PSNR_CAP (not infinity) so tables
stay numeric. SSIM needs at least 11 x 11 pixels (its Gaussian window); smaller images get NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from pipeline.io.images import to_batch
from pipeline.metrics.base import PairMetric

PSNR_CAP = 100.0  # dB, reported for identical images
SSIM_MIN_SIDE = 11  # SSIM's Gaussian window


def linf(clean: np.ndarray, protected: np.ndarray) -> float:
    return float(np.abs(clean.astype(np.int32) - protected.astype(np.int32)).max())


def psnr(clean: np.ndarray, protected: np.ndarray) -> float:
    if np.array_equal(clean, protected):
        return PSNR_CAP
    a, b = (to_batch([img], "uint8").to(torch.float64) for img in (protected, clean))
    return min(float(peak_signal_noise_ratio(a, b, data_range=255.0)), PSNR_CAP)


def ssim(clean: np.ndarray, protected: np.ndarray) -> float:
    if min(clean.shape[:2]) < SSIM_MIN_SIDE:
        return math.nan
    # float32: 10x faster than float64 on CPU, equal to 1e-6 on uint8 images
    a, b = (to_batch([img], "uint8").to(torch.float32) for img in (protected, clean))
    return float(structural_similarity_index_measure(a, b, data_range=255.0))


class Linf(PairMetric):
    """Largest pixel difference (0-255 units), averaged over the pairs: the written budget."""

    name, higher_is_better = "linf", False

    def compute(self, images, references) -> float:
        return float(np.mean([linf(r, x) for x, r in zip(images, references)]))


class PSNR(PairMetric):
    """Peak signal-to-noise ratio (dB; identical images: PSNR_CAP), averaged over the pairs."""

    name, higher_is_better = "psnr", True

    def compute(self, images, references) -> float:
        return float(np.mean([psnr(r, x) for x, r in zip(images, references)]))


class SSIM(PairMetric):
    """Structural similarity (0-1; identical images: 1), averaged over the pairs; NaN below 11 x 11 pixels."""

    name, higher_is_better = "ssim", True

    def compute(self, images, references) -> float:
        if min(images[0].shape[:2]) < SSIM_MIN_SIDE:
            return math.nan
        return float(np.nanmean([ssim(r, x) for x, r in zip(images, references)]))
