"""The pre-training recipe of a FastProtect bank (`TrainConfig`), and the built-in tiny model's fixed one.

No torch here: `train-fastprotect --help` shows these defaults before anything heavy is imported
(train.py runs the recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

CENTROID_GRID = 8  # side of the pooled latent k-means groups by (features.pooled_latent)


@dataclass
class TrainConfig:
    steps: int = 10_000
    batch_size: int = 4
    resolution: int = 512  # R: training side; inference resizes to any size
    groups: int = 4  # K
    eta: float = 8.0  # budget of d_g + d_k in [0, 255] pixel units (paper: 8/255); each part eta/2
    feature_weight: float = 3.5e-5  # lambda
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.99)
    seed: int = 0
    log_every: int = 50
    centroid_grid: int = CENTROID_GRID
    kmeans_iters: int = 100

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.steps < 0 or self.batch_size < 1 or self.groups < 1:
            raise ValueError("steps must be >= 0, batch_size and groups >= 1")
        if self.resolution < 8 or not 0 < self.eta <= 255:
            raise ValueError("resolution must be >= 8 and eta in (0, 255] pixel units")


# the fixed recipe of the built-in tiny model's default bank (README: train-fastprotect --model tiny --data skimage)
TINY_DEFAULT = TrainConfig(steps=80, batch_size=4, resolution=64, lr=2e-3, log_every=10)
TINY_DEFAULT_IMAGES = 32
