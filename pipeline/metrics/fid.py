"""FID and KID of a generated set against references (torchmetrics), on features that are never downloaded.

The features are torch-fidelity's Inception (2048 features, images at 299 x 299) from ``fid_weights``
(``pt_inception-2015-12-05-6726825d.pth``; needs the torch-fidelity package): calibrated. Without it, a
small seeded random conv net (`RandomFeatures`, 64 features) on the images at the generated set's size:
uncalibrated, for ranking settings within one run. FID needs many images (its covariance estimate):
it is only computed for sets of at least ``min_images``; KID, unbiased, for any set of 2 or more.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from torch import nn

from pipeline.io.images import resize_image, resize_pixels, to_batch
from pipeline.metrics.base import SET, Metric
from pipeline.seeds import seeded_global_rng

SEED = 1234  # RandomFeatures'
INCEPTION_SIZE = 299


class RandomFeatures(nn.Module):
    """A small seeded conv net mapping uint8 images to 64 features: FID/KID's stand-in for Inception."""

    num_features = 64

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float() * 2 - 1
        x = resize_pixels(x, (64, 64))
        return self.net(x)


class SetFeatures:
    """FID/KID's feature extractor (loaded on first use, once) and the pixels it is fed."""

    def __init__(self, weights: str | None = None, device: torch.device | str = "cpu"):
        self.weights, self.device = weights, torch.device(device)
        self.calibrated = bool(weights)

    @cached_property
    def extractor(self) -> nn.Module:
        """torch-fidelity's Inception from `weights`, else RandomFeatures."""
        if self.weights:
            try:
                from torchmetrics.image.fid import NoTrainInceptionV3

                return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=self.weights)
            except ModuleNotFoundError as err:
                raise RuntimeError("fid_weights needs the torch-fidelity package (pip install torch-fidelity)") from err
        with seeded_global_rng(SEED):
            return RandomFeatures()

    def pixels(self, images: list[np.ndarray], side: int) -> torch.Tensor:
        """uint8 N x 3 x side x side on the device (contiguous: the figures were fixed on it)."""
        return to_batch([resize_image(img, (side, side)) for img in images], "uint8").contiguous().to(self.device)


class SetDistance(Metric):
    """A torchmetrics distance between the features of two image sets (FID, KID): lower is more alike."""

    higher_is_better, compares = False, SET
    min_images = 2

    def __init__(self, features: SetFeatures):
        self.features, self.calibrated = features, features.calibrated

    def torchmetric(self, n: int):
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, generated: list[np.ndarray], references: list[np.ndarray]) -> float | None:
        n = min(len(generated), len(references))
        if n < max(2, self.min_images):
            return None
        side = INCEPTION_SIZE if self.features.weights else generated[0].shape[0]
        metric = self.torchmetric(n).to(self.features.device)
        metric.update(self.features.pixels(references, side), real=True)
        metric.update(self.features.pixels(generated, side), real=False)
        value = metric.compute()
        return float(value[0] if isinstance(value, tuple) else value)  # KID: (mean, std)


class KID(SetDistance):
    """Kernel Inception Distance (unbiased: any set of 2 or more), subsets of min(subset_size, n) images."""

    name = "kid"

    def __init__(self, features: SetFeatures, subset_size: int = 1000):
        super().__init__(features)
        self.subset_size = subset_size

    def torchmetric(self, n: int):
        from torchmetrics.image.kid import KernelInceptionDistance

        return KernelInceptionDistance(feature=self.features.extractor, subset_size=min(self.subset_size, n))


class FID(SetDistance):
    """Fréchet Inception Distance, only for sets of at least `min_images` (else None)."""

    name = "fid"

    def __init__(self, features: SetFeatures, min_images: int = 50):
        super().__init__(features)
        self.min_images = min_images

    def torchmetric(self, n: int):
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=self.features.extractor)
