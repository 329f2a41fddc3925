"""`blur:SIGMA`: Gaussian blur with standard deviation SIGMA pixels (torchvision), kernel 2 ceil(3 sigma) + 1.

Source: Gaussian filtering as a purification (CopyrightMeter; Diff-Protect's robustness section).
Larger sigma removes more high frequencies. Deterministic.
"""

from __future__ import annotations

import math

from pipeline.io.images import to_tensor, to_uint8
from pipeline.study.purify.base import Purification


class GaussianBlur(Purification):
    name = "blur"

    def check(self):
        if self.param < 0:
            raise ValueError(f"blur:SIGMA needs sigma >= 0, got {self.param:g}")

    def one(self, rgb, seed, context):
        if self.param == 0:
            return rgb.copy()
        from torchvision.transforms.functional import gaussian_blur

        size = 2 * math.ceil(3 * self.param) + 1
        return to_uint8(gaussian_blur(to_tensor(rgb), [size, size], [self.param, self.param]))


UNIT = GaussianBlur
