"""`quantize:BITS`: keep BITS bits per channel (1-8), each value put at the middle of its bin.

Source: bit-depth reduction, "feature squeezing" (Xu et al., NDSS 2018); CopyrightMeter's
quantisation. Fewer bits is a stronger purification. Deterministic.
"""

from __future__ import annotations

import numpy as np

from pipeline.study.purify.base import Purification


class Quantize(Purification):
    name = "quantize"
    stronger = "smaller"

    def check(self):
        if self.param != int(self.param) or not 1 <= self.param <= 8:
            raise ValueError(f"quantize:BITS needs a whole number of bits in [1, 8], got {self.param:g}")

    def one(self, rgb, seed, context):
        step = 2 ** (8 - int(self.param))
        if step == 1:
            return rgb.copy()
        return (rgb.astype(np.int32) // step * step + step // 2).clip(0, 255).astype(np.uint8)


UNIT = Quantize
