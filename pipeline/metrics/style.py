"""A style score that does not come from the mimic's own model: style descriptors, distance, retrieval accuracy.

A style descriptor of an image is two unit-length blocks, concatenated (each weighs the same):

- **texture**: Gram statistics of a fixed convolutional feature extractor (Gatys et al. 2016): for
  feature maps F_l (C_l x HW) at a few layers, G_l = F_l F_l^T / HW, upper triangle, signed square
  root, the whole block L2-normalised. The extractor is VGG-19's first blocks when ``style_weights``
  gives torchvision's ImageNet VGG-19 state dict (``vgg19-dcbb9e9d.pth``, the classic style
  representation; rows are then ``calibrated``), else a seeded random conv net of the same shape (random
  conv features still separate textures: Ustyuzhaninov et al. 2017) and the rows are uncalibrated;
- **palette**: a soft 6 x 6 x 6 RGB histogram (square-rooted: the Hellinger embedding), so distances
  between palettes are distances between the colours an artist uses, not where they are.

Given reference images of several candidate styles (an evaluation's groups, or the built-in world's
held-out artists), `StyleJudge` answers for each generated image "whose style is nearest?" (distance
to each style's mean descriptor): the **style accuracy** (`StyleAccuracy`) of a set is the fraction
attributed to the artist it should imitate (chance = 1 / number of candidates), and the **style distance**
(`StyleDistance`) is the mean distance to that artist's mean descriptor in units of the artist's own
spread (the mean distance of its reference images to their mean; about 1 means "as close as the
artist's own images"). Both are metrics (metrics/base.py) called as ``metric(images, style name)``.

What it measures: colour use and local texture statistics (marks, strokes, grain). What it cannot:
composition, subject matter, drawing skill, or anything a person calls style beyond those; with a
random backbone it ranks settings within one run and is not comparable with published style metrics
(CSD, Gram-VGG with ImageNet weights).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from torch import nn

from pipeline.io.images import center_crop_resize, to_batch
from pipeline.metrics.base import STYLE, Metric
from pipeline.seeds import seeded_global_rng

RANDOM_SEED = 1234
VGG_LAYERS = (1, 6, 11)  # relu1_1, relu2_1, relu3_1 in torchvision's vgg19().features
HIST_BINS = 6


def _random_trunk() -> nn.Sequential:
    """VGG-19's first three blocks' shape, narrower, seeded (the stand-in without ``style_weights``)."""
    with seeded_global_rng(RANDOM_SEED):
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),  # 0, 1
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),  # 2-4
            nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(),  # 5, 6
            nn.Conv2d(48, 48, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),  # 7-9
            nn.Conv2d(48, 64, 3, padding=1), nn.ReLU(),  # 10, 11
        )


def _vgg_trunk(weights: str) -> nn.Sequential:
    from torchvision.models import vgg19

    from pipeline.metrics.lpips import load_state_dict

    model = vgg19(weights=None)
    model.load_state_dict(load_state_dict(weights))
    return model.features[: VGG_LAYERS[-1] + 1]


class StyleDescriptor:
    """Images (uint8 H x W x 3) -> style descriptors (N x D, two unit blocks: texture, palette)."""

    def __init__(self, weights: str | None = None, device: str | torch.device = "cpu"):
        self.weights = weights
        self.device = torch.device(device)

    @property
    def calibrated(self) -> bool:
        return bool(self.weights)

    @cached_property
    def trunk(self) -> nn.Sequential:
        net = _vgg_trunk(self.weights) if self.weights else _random_trunk()
        return net.eval().requires_grad_(False).to(self.device)

    def _grams(self, x: torch.Tensor) -> torch.Tensor:
        blocks = []
        for i, layer in enumerate(self.trunk):
            x = layer(x)
            if i in VGG_LAYERS:
                f = x.flatten(2)  # N x C x HW
                gram = f @ f.transpose(1, 2) / f.shape[-1]
                iu = torch.triu_indices(gram.shape[1], gram.shape[1])
                g = gram[:, iu[0], iu[1]]
                blocks.append(nn.functional.normalize(g.sign() * g.abs().sqrt(), dim=1))
        return nn.functional.normalize(torch.cat(blocks, 1), dim=1)

    @staticmethod
    def _palette(x: torch.Tensor) -> torch.Tensor:
        """Soft RGB histogram (triangular kernel per channel), square-rooted: unit length (Hellinger)."""
        centres = torch.linspace(0, 1, HIST_BINS, device=x.device)
        w = (1 - (x[:, :, None] - centres[None, None, :, None, None]).abs() * (HIST_BINS - 1)).clamp_min(0)
        hist = torch.einsum("nahw,nbhw,nchw->nabc", w[:, 0], w[:, 1], w[:, 2]).flatten(1)
        return (hist / hist.sum(1, keepdim=True)).sqrt()

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], size: int) -> torch.Tensor:
        """Descriptors of `images`, each seen as its centre square at `size` px (as the mimics see them)."""
        x = to_batch([center_crop_resize(img, size) for img in images], "uint8").float().to(self.device) / 255
        if self.weights:  # ImageNet normalisation for VGG
            mean = torch.tensor([0.485, 0.456, 0.406], device=self.device)[None, :, None, None]
            std = torch.tensor([0.229, 0.224, 0.225], device=self.device)[None, :, None, None]
            texture = self._grams((x - mean) / std)
        else:
            texture = self._grams(x * 2 - 1)
        return torch.cat([texture, self._palette(x)], 1).cpu() / np.sqrt(2)


class StyleJudge:
    """Nearest-style retrieval among candidate styles, each given by reference images.

    `references`: {style name: images}. Each style is its mean descriptor (the prototype) and its
    spread (mean distance of its references to the prototype).
    """

    def __init__(self, descriptor: StyleDescriptor, references: dict[str, list[np.ndarray]], size: int):
        if not references:
            raise ValueError("a style judge needs the reference images of at least one style")
        self.descriptor, self.size = descriptor, size
        self.names = list(references)
        descs = [descriptor(list(imgs), size) for imgs in references.values()]
        self.prototypes = torch.stack([d.mean(0) for d in descs])
        self.spread = torch.stack([(d - d.mean(0)).norm(dim=1).mean().clamp_min(1e-6) for d in descs])

    def distances(self, images: list[np.ndarray]) -> torch.Tensor:
        """N x S distances of each image's descriptor to each style's prototype."""
        return torch.cdist(self.descriptor(images, self.size), self.prototypes)

    def attribute(self, images: list[np.ndarray]) -> list[str]:
        """The nearest style of each image."""
        return [self.names[int(i)] for i in self.distances(images).argmin(1)]

    def score(self, images: list[np.ndarray], style: str) -> dict[str, list[float]]:
        """Per image: ``style_match`` (1 when `style` is the nearest candidate, else 0) and
        ``style_distance`` (distance to `style`'s prototype over its spread); the metrics below average them."""
        d = self.distances(images)
        j = self.names.index(style)
        return {"style_match": (d.argmin(1) == j).float().tolist(),
                "style_distance": (d[:, j] / self.spread[j]).tolist()}


class StyleAccuracy(Metric):
    """Fraction of the images whose nearest candidate style is `style` (chance: 1 / candidates); None with a
    single candidate (nothing to confuse it with)."""

    name, higher_is_better, compares = "style_accuracy", True, STYLE

    def __init__(self, judge: StyleJudge):
        self.judge, self.calibrated = judge, judge.descriptor.calibrated

    def __call__(self, images: list[np.ndarray], style: str) -> float | None:
        if len(self.judge.names) < 2:
            return None
        return float(np.mean(self.judge.score(images, style)["style_match"]))


class StyleDistance(Metric):
    """Mean distance of the images to `style`'s prototype, in units of the style's own spread (about 1: as close
    as the artist's own images)."""

    name, higher_is_better, compares = "style_distance", False, STYLE

    def __init__(self, judge: StyleJudge):
        self.judge, self.calibrated = judge, judge.descriptor.calibrated

    def __call__(self, images: list[np.ndarray], style: str) -> float:
        return float(np.mean(self.judge.score(images, style)["style_distance"]))


def reference_styles(spec: str | None, s3=None, per_style: int = 16) -> dict[str, list[np.ndarray]]:
    """Extra candidate styles for `StyleJudge` besides an evaluation's own groups:

    - ``"builtin"``: the built-in style world's 8 held-out artists (styles.HELD_OUT_STYLES), painted on
      photos that no artist image in tests or benchmarks uses (styles.JUDGE_PHOTOS);
    - a folder (local or s3://) holding one sub-folder of images per style, named by the style;
    - None: none.
    """
    if not spec:
        return {}
    if spec == "builtin":
        from pipeline.data.styles import HELD_OUT_STYLES, JUDGE_PHOTOS, artist_images

        return {s.name: artist_images(s, per_style, 64, seed=31, photos=JUDGE_PHOTOS) for s in HELD_OUT_STYLES}
    import posixpath

    from pipeline.io.images import decode_image
    from pipeline.io.storage import list_images, split_uri

    fs, root = split_uri(spec, s3)
    out: dict[str, list[np.ndarray]] = {}
    for path in list_images(fs, root):
        rel = posixpath.relpath(path, root)
        if "/" not in rel:
            continue  # a style is a sub-folder; files at the top level belong to none
        images = out.setdefault(rel.split("/")[0], [])
        if len(images) < per_style:
            with fs.open_input_file(path) as f:
                images.append(decode_image(f.read()).rgb)
    if not out:
        raise ValueError(f"--style-references {spec}: no sub-folder of images (one per style) found")
    return out


def merge_references(extra: dict[str, list], groups: dict[str, list]) -> dict[str, list]:
    """The judge's candidates: the reference styles and an evaluation's groups; a group named like a reference
    style (an archive made from the built-in world) pools both image sets, one style with one prototype."""
    out = {name: list(images) for name, images in extra.items()}
    for name, images in groups.items():
        out[name] = out.get(name, []) + list(images)
    return out
