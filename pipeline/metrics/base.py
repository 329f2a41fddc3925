"""What a metric is: a class whose facts are attributes, called one way.

    metric = LPIPS(weights=None, device="cpu")   # backbones are given when it is built, loaded on first use
    metric.name              "lpips"             # the `metric` column of the tables (a pair metric's rows
                                                 # add _pair / _ref: what the references were)
    metric.higher_is_better  False               # True when a larger value means more alike (torchmetrics')
    metric.compares          PAIR                # what it is called with, below
    metric.calibrated        False               # False: built with a seeded random backbone, so its values
                                                 # rank settings within a run, not against published figures
    metric(images, against) -> float | None      # None: not defined on these inputs (FID of a small set)

`compares`, and what `against` is:
    PAIR    references: image i against reference i (uint8 H x W x 3 each), averaged over the pairs; a
            reference of another size is first brought to its image's size (`same_size`)
    SET     references: a generated set against a reference set (uint8 H x W x 3 each)
    PROMPT  prompts: images against their prompts (a list, or one prompt for every image)
    STYLE   a style's name: images against one of a style judge's candidate styles (metrics/style.py)

Images come first and are the ones judged (protected, generated); `against` is what they are
measured against (clean, references), as torchmetrics' (preds, target).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeline.io.images import center_crop_resize, resize_image

PAIR, SET, PROMPT, STYLE = "pair", "set", "prompt", "style"


class Metric:
    """One metric: its facts as attributes (module doc), called as ``metric(images, against)``."""

    name: str
    higher_is_better: bool
    compares: str
    calibrated: bool = True  # metrics with a backbone set it from the weights they were built with

    def __call__(self, images: list[np.ndarray], against) -> float | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, calibrated={self.calibrated})"


class PairMetric(Metric):
    """A metric of image i against reference i, averaged: subclasses implement `compute` on same-size pairs."""

    compares = PAIR

    def __call__(self, images: list[np.ndarray], references: list[np.ndarray]) -> float:
        if len(images) != len(references) or not images:
            raise ValueError(f"{self.name} compares two equally long non-empty lists, got {len(images)} and "
                             f"{len(references)}")
        return self.compute(*same_size(images, references))

    def compute(self, images: list[np.ndarray], references: list[np.ndarray]) -> float:
        raise NotImplementedError


def same_size(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """b brought to a's sizes where they differ (mimic outputs vs references at native size): a square output
    gets the reference as the mimic saw it (shorter side resized, centre crop: io/images.center_crop_resize)."""

    out = []
    for x, y in zip(a, b):
        if x.shape != y.shape:
            y = center_crop_resize(y, x.shape[0]) if x.shape[0] == x.shape[1] else resize_image(y, x.shape[:2])
        out.append(y)
    return a, out


def measure(metrics: Iterable[Metric], images: list[np.ndarray], references: list[np.ndarray] | None = None,
            prompts: list[str] | str | None = None, style: str | None = None) -> list[tuple[Metric, float]]:
    """(metric, value) for each of `metrics` defined on these inputs, each called with what it compares."""
    against = {PAIR: references, SET: references, PROMPT: prompts, STYLE: style}
    out = []
    for metric in metrics:
        value = metric(images, against[metric.compares])
        if value is not None:
            out.append((metric, value))
    return out
