"""`tvm:WEIGHT`: total-variation minimisation, argmin_u ||u - x||^2 / 2 + WEIGHT TV(u) (Chambolle).

Source: Guo et al., "Countering adversarial images using input transformations" (ICLR 2018);
CopyrightMeter's TVM. Solved with scikit-image's `denoise_tv_chambolle` in [0, 1] units, all
channels jointly. A larger weight gives a flatter image. Deterministic.
"""

from __future__ import annotations

import numpy as np

from pipeline.study.purify.base import Purification


class TotalVariation(Purification):
    name = "tvm"

    def check(self):
        if self.param < 0:
            raise ValueError(f"tvm:WEIGHT needs a weight >= 0, got {self.param:g}")

    def one(self, rgb, seed, context):
        if self.param == 0:
            return rgb.copy()
        from skimage.restoration import denoise_tv_chambolle

        out = denoise_tv_chambolle(rgb.astype(np.float64) / 255.0, weight=self.param, channel_axis=-1)
        return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


UNIT = TotalVariation
