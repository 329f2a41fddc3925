"""Visibility metrics between a clean and a protected image (uint8 H x W x 3 arrays).

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

PSNR_CAP = 100.0  # dB, reported for identical images


def _to_tensor(img: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(img).permute(2, 0, 1)[None].to(dtype)  # a copy: decoded arrays are read-only


def linf(clean: np.ndarray, protected: np.ndarray) -> float:
    return float(np.abs(clean.astype(np.int32) - protected.astype(np.int32)).max())


def psnr(clean: np.ndarray, protected: np.ndarray) -> float:
    if np.array_equal(clean, protected):
        return PSNR_CAP
    value = float(peak_signal_noise_ratio(_to_tensor(protected), _to_tensor(clean), data_range=255.0))
    return min(value, PSNR_CAP)


def ssim(clean: np.ndarray, protected: np.ndarray) -> float:
    if min(clean.shape[:2]) < 11:
        return math.nan
    # float32: 10x faster than float64 on CPU, equal to 1e-6 on uint8 images
    a, b = _to_tensor(protected, torch.float32), _to_tensor(clean, torch.float32)
    return float(structural_similarity_index_measure(a, b, data_range=255.0))


def visibility_metrics(clean: np.ndarray, protected: np.ndarray) -> dict[str, float]:
    """L-inf (pixel units), PSNR (dB) and SSIM of `protected` against `clean`."""
    return {"linf": linf(clean, protected), "psnr": psnr(clean, protected), "ssim": ssim(clean, protected)}
