"""Metrics: visibility of a perturbation, and how much a mimic is damaged.

- `visibility`  PSNR, SSIM, L-inf between a clean and a protected image
- `lpips`       the LPIPS network (weights path, or a random backbone marked uncalibrated)
- `mimicry`     paired and set metrics of the evaluation (PSNR, SSIM, LPIPS, CLIP, FID) and backbones
"""

from pipeline.metrics.visibility import PSNR_CAP, linf, psnr, ssim, visibility_metrics

__all__ = ["PSNR_CAP", "linf", "psnr", "ssim", "visibility_metrics"]
