"""`none`: the image as it is (the column every other purification is compared with)."""

from __future__ import annotations

from pipeline.study.purify.base import Purification


class NoPurification(Purification):
    name = "none"

    def one(self, rgb, seed, context):
        return rgb.copy()


UNIT = NoPurification
