"""Metrics: how visible a perturbation is, and how much a mimic is damaged.

A metric is a class whose facts are attributes, called one way (base.py):
``metric.name``, ``.higher_is_better``, ``.compares``, ``.calibrated``, and ``metric(images, against)``.

    class                 name            compares  higher is better  backbone (seeded random without weights)
    Linf                  linf            pair      no                -
    PSNR                  psnr            pair      yes               -
    SSIM                  ssim            pair      yes               -
    LPIPS                 lpips           pair      no                AlexNet trunk (lpips_weights)
    CLIPImageSimilarity   clip_i2i        pair      yes               CLIP (clip_model)
    CLIPSetSimilarity     clip_i2i_ref    set       yes               CLIP (clip_model)
    CLIPScore             clip_score      prompt    yes               CLIP (clip_model)
    KID                   kid             set       no                Inception (fid_weights)
    FID                   fid             set       no                Inception (fid_weights)
    StyleAccuracy         style_accuracy  style     yes               VGG-19 blocks (style_weights)
    StyleDistance         style_distance  style     no                VGG-19 blocks (style_weights)

- `base`        what a metric is: `Metric`, `PairMetric`, `same_size`, `measure`
- `visibility`  L-inf, PSNR, SSIM (no backbone; the protect job's measurements)
- `lpips`       LPIPS-alex (weights path, or a random trunk), also FastProtect's spatial strength map
- `clip`        CLIP image-image and image-prompt similarities
- `fid`         FID and KID
- `style`       the style descriptor and judge, style accuracy and distance
- `mimicry`     `MetricConfig` and `Metrics`: one process's metrics for the evaluation and the study
"""

from pipeline.metrics.base import PAIR, PROMPT, SET, STYLE, Metric, PairMetric, measure, same_size
from pipeline.metrics.clip import CLIPImageSimilarity, CLIPScore, CLIPSetSimilarity
from pipeline.metrics.fid import FID, KID
from pipeline.metrics.lpips import LPIPS
from pipeline.metrics.style import StyleAccuracy, StyleDistance
from pipeline.metrics.visibility import PSNR, PSNR_CAP, SSIM, Linf, linf, psnr, ssim

METRICS: tuple[type[Metric], ...] = (Linf, PSNR, SSIM, LPIPS, CLIPImageSimilarity, CLIPSetSimilarity, CLIPScore,
                                     KID, FID, StyleAccuracy, StyleDistance)

__all__ = ["FID", "KID", "LPIPS", "METRICS", "PAIR", "PROMPT", "PSNR", "PSNR_CAP", "SET", "SSIM", "STYLE",
           "CLIPImageSimilarity", "CLIPScore", "CLIPSetSimilarity", "Linf", "Metric", "PairMetric", "StyleAccuracy",
           "StyleDistance", "linf", "measure", "psnr", "same_size", "ssim"]
