"""Visibility of a change: L-inf, PSNR and SSIM of an image against a reference (uint8 H x W x 3 arrays).

The metric classes (`Linf`, `PSNR`, `SSIM`: pipeline.metrics.base) are what the pipeline calls; the functions
below are their per-image kernels, ``f(reference, image)``: the definitions torchmetrics implements (and
tests/test_metrics.py holds them to its values), written here so that measuring a written file neither imports
torchmetrics (4 s of a fresh process's start: every Ray worker and command) nor runs a dense 11 x 11 convolution.

    PSNR = 10 log10(255^2 / MSE)                                     identical images: PSNR_CAP, so tables stay numeric
    SSIM = mean over pixels and channels of                           (Wang et al. 2004, eq. 13)
           (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))
           mu, sigma: local moments under an 11 x 11 Gaussian window, sigma 1.5, filtered separably (the window
           is the outer product of the 1-D Gaussian: two 11-tap passes) (float32: torchmetrics' own
           arithmetic, equal to 1e-6 on uint8 images and 10x faster than float64 on CPU); the image
           reflect-padded by 5 so the map covers every pixel; C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2;
           variances clamped at 0.
SSIM needs at least 11 x 11 pixels (its Gaussian window); smaller images get NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.io.images import to_batch
from pipeline.metrics.base import PairMetric

PSNR_CAP = 100.0  # dB, reported for identical images
SSIM_MIN_SIDE = 11  # SSIM's Gaussian window
SSIM_SIGMA, SSIM_K1, SSIM_K2 = 1.5, 0.01, 0.03


def _gaussian(size: int = SSIM_MIN_SIDE, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian (float32); the 2-D window is its outer product, so filtering is separable."""
    d = torch.arange((1 - size) / 2, (1 + size) / 2, 1, dtype=torch.float32)
    g = torch.exp(-torch.pow(d / sigma, 2) / 2)
    return g / g.sum()


_GAUSS = _gaussian()


def _window_mean(t: torch.Tensor) -> torch.Tensor:
    """Each channel under the 11 x 11 Gaussian window (valid part), as two 11-tap passes: 22 multiply-adds a pixel
    instead of the dense window's 121."""
    c = t.shape[1]
    t = F.conv2d(t, _GAUSS.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(t, _GAUSS.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def linf(clean: np.ndarray, protected: np.ndarray) -> float:
    return float(np.abs(clean.astype(np.int32) - protected.astype(np.int32)).max())


def psnr(clean: np.ndarray, protected: np.ndarray) -> float:
    if np.array_equal(clean, protected):
        return PSNR_CAP
    mse = np.mean((clean.astype(np.float64) - protected.astype(np.float64)) ** 2)
    return min(10.0 * math.log10(255.0**2 / mse), PSNR_CAP)


def ssim(clean: np.ndarray, protected: np.ndarray) -> float:
    if min(clean.shape[:2]) < SSIM_MIN_SIDE:
        return math.nan
    x, y = (to_batch([img], "uint8").to(torch.float32) for img in (protected, clean))
    pad = SSIM_MIN_SIDE // 2
    x, y = (F.pad(t, (pad, pad, pad, pad), mode="reflect") for t in (x, y))
    moments = _window_mean(torch.cat([x, y, x * x, y * y, x * y]))
    mu_x, mu_y, xx, yy, xy = moments.split(1)
    c1, c2 = (SSIM_K1 * 255.0) ** 2, (SSIM_K2 * 255.0) ** 2
    var_x, var_y = (xx - mu_x.pow(2)).clamp(min=0.0), (yy - mu_y.pow(2)).clamp(min=0.0)
    cov = xy - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return float(index.mean())


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
