"""The metrics of the mimicry evaluation and the study: one process's set of them, built from `MetricConfig`.

- ``visibility``: PSNR, SSIM, LPIPS of a protected input against its clean original;
- ``paired``: the same and CLIP image similarity, mimic output i against reference i (its clean input's
  output: rows ``<m>_pair``; the clean input: ``<m>_ref``), averaged;
- ``sets``: KID, FID (sets of at least ``fid_min_images``), CLIP similarity of every (generated, reference)
  pair (``clip_i2i_ref``), and the CLIP score against the prompt;
- ``style(references, size)``: style accuracy and distance among candidate styles (metrics/style.py).

Backbones. Nothing is downloaded. Each network comes from a local weights path when given:
``lpips_weights`` (torchvision AlexNet state dict, .pth or .safetensors), ``clip_model`` (a
transformers CLIP directory, e.g. a local copy of openai/clip-vit-large-patch14),
``fid_weights`` (torch-fidelity's Inception weights, ``pt_inception-2015-12-05-6726825d.pth``;
needs the torch-fidelity package) and ``style_weights`` (torchvision VGG-19). Without one, a seeded random
network of the same kind is used (AlexNet trunk, a small CLIPModel built from a config, a small conv
feature extractor for FID/KID, a narrow VGG-shaped trunk) and the metric's ``calibrated`` is False: the
numbers then rank settings within one run but are not comparable with published figures. PSNR and SSIM
need no backbone. Backbones load on first use, once per process, and are shared by the metrics using them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.metrics.base import Metric
from pipeline.metrics.clip import CLIPEmbeddings, CLIPImageSimilarity, CLIPScore, CLIPSetSimilarity
from pipeline.metrics.fid import FID, KID, SetFeatures
from pipeline.metrics.lpips import LPIPS
from pipeline.metrics.style import StyleAccuracy, StyleDescriptor, StyleDistance, StyleJudge
from pipeline.metrics.visibility import PSNR, SSIM
from pipeline.models.loading import resolve_device


@dataclass
class MetricConfig:
    lpips_weights: str | None = None
    clip_model: str | None = None
    fid_weights: str | None = None
    fid_min_images: int = 50  # FID of fewer images is dominated by its covariance estimate; use KID
    style_weights: str | None = None  # torchvision VGG-19 state dict for the style score (metrics/style.py)
    style_references: str | None = None  # extra candidate styles: "builtin" or a folder of sub-folders
    kid_subset_size: int = 1000
    device: str = "auto"


class Metrics:
    """The metrics of one process, grouped by what they are called with (module doc)."""

    def __init__(self, config: MetricConfig | None = None):
        self.config = cfg = config or MetricConfig()
        self.device = resolve_device(cfg.device)
        self.lpips = LPIPS(cfg.lpips_weights, self.device)
        clip = CLIPEmbeddings(cfg.clip_model, self.device)
        features = SetFeatures(cfg.fid_weights, self.device)
        self.visibility: tuple[Metric, ...] = (PSNR(), SSIM(), self.lpips)
        self.paired: tuple[Metric, ...] = (*self.visibility, CLIPImageSimilarity(clip))
        self.sets: tuple[Metric, ...] = (KID(features, cfg.kid_subset_size), FID(features, cfg.fid_min_images),
                                         CLIPSetSimilarity(clip), CLIPScore(clip))
        self.style_descriptor = StyleDescriptor(cfg.style_weights, self.device)

    def style(self, references: dict[str, list[np.ndarray]], size: int) -> tuple[Metric, Metric]:
        """Style accuracy and distance among the candidate styles `references` ({name: images}), at `size` px."""
        judge = StyleJudge(self.style_descriptor, references, size)
        return StyleAccuracy(judge), StyleDistance(judge)

    @property
    def calibrated(self) -> dict[str, bool]:
        """Per metric (a pair metric's name without its _pair/_ref): True when its backbone has real weights."""
        out = {m.name: m.calibrated for m in (*self.paired, *self.sets)}
        out.update(style_accuracy=self.style_descriptor.calibrated, style_distance=self.style_descriptor.calibrated)
        return out
