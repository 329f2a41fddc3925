"""scikit-image's bundled photos (no download) and their one split between training and evaluation.

Every built-in model is trained on crops of `TRAIN_PHOTOS` (`pipeline/train/`); the `HELD_OUT` photos are
never cropped for training, and every figure about a built-in is measured on them (`held_out_images`).
`UNFAMILIAR` photos come from outside scikit-image (matplotlib's bundled sample data): no built-in ever saw
their kind of content (a portrait, a product shot).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.io.images import to_tensor

SEED = 0

# scikit-image's bundled photos (no download). Grayscale ones are repeated to RGB.
TRAIN_PHOTOS = ("astronaut", "coffee", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina",
                "colorwheel", "camera", "coins", "moon", "brick", "grass", "gravel", "clock", "cell")
HELD_OUT = ("rocket", "motorcycle")  # whole photos kept out of training, for evaluation only
# Photos from outside scikit-image (matplotlib's bundled sample data): no built-in ever saw their kind of
# content (a portrait, a product shot); the VAE's "unfamiliar photo" figure (bench_builtin_tiny.py).
UNFAMILIAR = {"grace_hopper": "grace_hopper.jpg", "minduka": "Minduka_Present_Blue_Pack.png"}


def load_photo(name: str) -> np.ndarray:
    """One bundled photo as H x W x 3 uint8 (scikit-image's, or matplotlib's for the UNFAMILIAR names)."""
    from skimage import data

    if name in UNFAMILIAR:
        import matplotlib.cbook
        from PIL import Image

        img = np.asarray(Image.open(matplotlib.cbook.get_sample_data(UNFAMILIAR[name])).convert("RGB"))
    else:
        img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    img = img[..., :3] if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) / img.max())).astype(np.uint8)
    return np.ascontiguousarray(img)


class PhotoCrops:
    """Random square crops of some photos at random scale, flipped at random, resized to `size`.

    `colour=True` also varies colour, since only a few bundled photos are in colour and a VAE trained
    on them alone renders smooth colour areas (sky, gradients) worse than bicubic upsampling does:
    a grayscale photo becomes a random two-colour gradient (a + (b - a) * gray, a and b random RGB),
    and a colour photo gets its channels permuted at random.
    """

    def __init__(self, names, seed: int = SEED, colour: bool = False):
        self.names = tuple(names)
        self.photos = [to_tensor(load_photo(n))[0] for n in self.names]
        self.grey = [bool((p[0] == p[1]).all() and (p[1] == p[2]).all()) for p in self.photos]
        self.gen = torch.Generator().manual_seed(seed)
        self.colour = colour

    def _int(self, lo: int, hi: int) -> int:  # uniform in [lo, hi)
        return int(torch.randint(lo, hi, (1,), generator=self.gen))

    def _recolour(self, crop: torch.Tensor, grey: bool) -> torch.Tensor:
        if grey:
            a, b = torch.rand(2, 1, 3, 1, 1, generator=self.gen)
            return a + (b - a) * crop[:, :1]
        return crop[:, torch.randperm(3, generator=self.gen)]

    def sample(self, n: int, size: int) -> tuple[torch.Tensor, list[int]]:
        """(n x 3 x size x size images in [0, 1], index of each crop's photo)."""
        crops, which = [], []
        for _ in range(n):
            i = self._int(0, len(self.photos))
            img = self.photos[i]
            h, w = img.shape[1:]
            side = self._int(min(size, h, w), min(h, w) + 1)
            top, left = self._int(0, h - side + 1), self._int(0, w - side + 1)
            crop = img[None, :, top : top + side, left : left + side]
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            if self._int(0, 2):
                crop = crop.flip(-1)
            if self.colour:
                crop = self._recolour(crop, self.grey[i])
            crops.append(crop[0].clamp(0, 1))
            which.append(i)
        return torch.stack(crops), which


def held_out_images(size: int = 64, crops_per_photo: int = 8, names=HELD_OUT) -> torch.Tensor:
    """The evaluation set: per held-out photo, its centre square and random crops, at size x size."""
    out = []
    for name in names:
        img = to_tensor(load_photo(name))[0]
        side = min(img.shape[1:])
        top, left = (img.shape[1] - side) // 2, (img.shape[2] - side) // 2
        centre = img[None, :, top : top + side, left : left + side]
        out.append(F.interpolate(centre, size=(size, size), mode="bilinear", antialias=True)[0])
        out.extend(PhotoCrops([name], seed=SEED + 1).sample(crops_per_photo, size)[0])
    return torch.stack(out).clamp(0, 1)
