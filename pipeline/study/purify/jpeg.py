"""`jpeg:Q`: JPEG compression at quality Q (1-95), then decoding (Pillow, 4:2:0 chroma subsampling).

Source: the standard baseline purification (Sandoval-Segura et al. 2023 on Mist/Glaze; the
CopyrightMeter benchmark). Lower Q removes more of a high-frequency perturbation, and more of
the image. Deterministic: no randomness.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.study.purify.base import Purification


class JPEG(Purification):
    name = "jpeg"
    stronger = "smaller"

    def check(self):
        if not 1 <= self.param <= 100:
            raise ValueError(f"jpeg:Q needs a quality in [1, 100], got {self.param:g}")

    def one(self, rgb, seed, context):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=int(round(self.param)))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy()


UNIT = JPEG
