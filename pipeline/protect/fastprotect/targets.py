"""The three target images y of FastProtect's adaptive targeted protection.

The paper uses three target images of low, medium and high *pattern repetition* (its Fig. 2:
simple textures are protected best by a low-repetition target, complex ones by a high one) and
does not publish them. Ours are generated, deterministic, and stored in every bank: the
project's high-frequency pattern (`pipeline.protect.targets.high_frequency_pattern`: checker,
stripes and rings in saturated colours) at three periods relative to the side R:

    low     period R / 2          (2 repetitions across the image)
    medium  period R / 8          (8 repetitions)
    high    period max(3, R / 64) (64 repetitions at R = 512; 21 at R = 64)
"""

from __future__ import annotations

import numpy as np

from pipeline.protect.targets import high_frequency_pattern

TARGET_NAMES = ("low", "medium", "high")


def target_periods(size: int) -> list[float]:
    return [size / 2, size / 8, max(3.0, size / 64)]


def repetition_targets(size: int) -> np.ndarray:
    """3 x size x size x 3 uint8: the low, medium and high repetition targets."""
    return np.stack([high_frequency_pattern(size, period=p) for p in target_periods(size)])
