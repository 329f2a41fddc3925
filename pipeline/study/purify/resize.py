"""`resize:F`: downscale by a factor F (> 1), then back up to the original size (Pillow, bicubic).

Source: resizing as an input transformation (Xie et al. 2018; Guo et al. 2018; CopyrightMeter).
F = 2 halves each side. Larger F loses more detail. Deterministic.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.study.purify.base import Purification


class Resize(Purification):
    name = "resize"

    def check(self):
        if self.param < 1:
            raise ValueError(f"resize:F needs a factor >= 1 (down by F, back up), got {self.param:g}")

    def one(self, rgb, seed, context):
        h, w = rgb.shape[:2]
        small = (max(1, round(w / self.param)), max(1, round(h / self.param)))
        img = Image.fromarray(rgb).resize(small, Image.BICUBIC, reducing_gap=None)
        return np.asarray(img.resize((w, h), Image.BICUBIC))


UNIT = Resize
