"""The built-in style world: a seeded family of painting styles rendered on crops of the bundled photos.

Style mimicry needs styles a small model can learn and a test can tell apart. Each style here is a
combination a person would call a style, drawn (seeded) from a few factors:

- a **palette** of 3-5 colours from one of eight families (ember, ocean, moss, dusk, sepia, pastel,
  neon, ink), dark to light: the image's tones are quantised onto it, so the palette *is* the colour
  grade (a sepia artist has no blue);
- a **mark**: how tones between two palette colours are drawn, as ordered dithering with the style's own
  pattern: flat (posterised), hatching (parallel lines at the style's angle), cross-hatching, halftone
  (a dot grid), stippling (random dots) or smearing (tones blurred along the style's angle first, as
  brush strokes drag paint);
- an **edge treatment**: none, ink outlines (edges drawn in the darkest colour) or light outlines;
- a **period** (3-6 px at 64 px) and an angle for the marks.

``STYLES`` holds 32 of them with pronounceable made-up names (no real artist); ``TRAIN_STYLES`` (24)
teach the built-in ``tiny-style`` model, ``HELD_OUT_STYLES`` (8) play the artists it never saw: every
held-out style is a new combination of factor values the training styles show. Rendering is pure torch,
deterministic for a given generator; `artist_images` gives the images of one "artist" (a style on
content crops from the held-out photos), what a mimic trains on in tests and benchmarks.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.photos import PhotoCrops
from pipeline.io.images import from_batch

SEED = 0
PALETTE_FAMILIES = {  # (hue range in degrees, saturation range, lightness range) of the family's colours
    "ember": ((0, 40), (0.65, 0.95), (0.12, 0.92)),
    "ocean": ((180, 235), (0.55, 0.9), (0.1, 0.9)),
    "moss": ((75, 140), (0.4, 0.8), (0.1, 0.88)),
    "dusk": ((260, 330), (0.45, 0.85), (0.12, 0.9)),
    "sepia": ((25, 45), (0.25, 0.5), (0.1, 0.93)),
    "pastel": ((0, 360), (0.35, 0.55), (0.55, 0.95)),
    "neon": ((0, 360), (0.9, 1.0), (0.05, 0.75)),
    "ink": ((0, 360), (0.0, 0.06), (0.03, 0.97)),
}
MARKS = ("flat", "hatching", "crosshatch", "halftone", "stipple", "smear")
EDGES = ("none", "ink", "light")
SYLLABLES = ("ka", "lo", "mir", "ve", "dan", "su", "ro", "tel", "qui", "na", "zor", "bel", "fi", "gar", "ul",
             "em", "ses", "no", "tar", "vi", "osk", "ra", "lin", "de")


@dataclass(frozen=True)
class Style:
    name: str
    family: str
    palette: tuple[tuple[float, float, float], ...]  # RGB in [0, 1], dark to light
    mark: str
    edge: str
    period: int  # px at 64 px
    angle: float  # radians

    @property
    def caption(self) -> str:
        return f"a painting in the style of {self.name}"

    def describe(self) -> str:
        return f"{self.name}: {self.family} palette ({len(self.palette)}), {self.mark}, {self.edge} edges"


def _hsl_to_rgb(h: float, s: float, lightness: float) -> tuple[float, float, float]:
    import colorsys

    return tuple(round(c, 4) for c in colorsys.hls_to_rgb((h % 360) / 360, lightness, s))


def _palette(family: str, k: int, rng: random.Random) -> tuple[tuple[float, float, float], ...]:
    (h0, h1), (s0, s1), (l0, l1) = PALETTE_FAMILIES[family]
    base = rng.uniform(h0, h1)
    spread = 60 if family in ("pastel", "neon") else (h1 - h0) / 2  # multi-hue families wander further
    lights = np.linspace(l0, l1, k)
    return tuple(_hsl_to_rgb(base + rng.uniform(-spread, spread) * (i / max(1, k - 1)), rng.uniform(s0, s1), float(li))
                 for i, li in enumerate(lights))


def _name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3))))
        if name not in taken and len(name) >= 4:
            taken.add(name)
            return name


def make_styles(n_per_family: int = 4, held_out_per_family: int = 1, seed: int = SEED) -> tuple[Style, ...]:
    """Per palette family, `n_per_family` styles of distinct (mark, edge): the training ones first, then
    the held-out ones (one per family by default: 24 + 8).

    Every held-out style is a combination no training style has, made of factor values that training
    styles show (a new artist combines known ways of painting; a model cannot know a mark it never saw);
    the held-out marks cycle through every mark.
    """
    rng = random.Random(seed)
    held_marks = [MARKS[i % len(MARKS)] for i in range(len(PALETTE_FAMILIES) * held_out_per_family)]
    rng.shuffle(held_marks)
    train, held = [], []
    for f_index, family in enumerate(PALETTE_FAMILIES):
        combos = [(m, e) for m in MARKS for e in EDGES]
        rng.shuffle(combos)
        mine = [next(c for c in combos if c[0] == held_marks[f_index * held_out_per_family + j])
                for j in range(held_out_per_family)]
        rest = [c for c in combos if c not in mine][: n_per_family - held_out_per_family]
        train += [(family, *c) for c in rest]
        held += [(family, *c) for c in mine]
    taken: set[str] = set()
    styles = []
    for family, mark, edge in train + held:
        styles.append(Style(name=_name(rng, taken), family=family, palette=_palette(family, rng.choice((3, 4, 5)), rng),
                            mark=mark, edge=edge, period=rng.choice((3, 4, 5, 6)),
                            angle=rng.choice((math.pi / 4, -math.pi / 4, 0.0, math.pi / 2, math.pi / 3))))
    return tuple(styles)


STYLES = make_styles()
N_TRAIN = 3 * len(PALETTE_FAMILIES)
TRAIN_STYLES, HELD_OUT_STYLES = STYLES[:N_TRAIN], STYLES[N_TRAIN:]
BY_NAME = {s.name: s for s in STYLES}


# --------------------------------------------------------------------------- rendering


def _luminance(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _stretch(lum: torch.Tensor) -> torch.Tensor:
    """Each image's tones stretched to [0, 1] between its 2nd and 98th percentiles (every colour used)."""
    flat = lum.flatten(1)
    lo, hi = flat.quantile(0.02, dim=1), flat.quantile(0.98, dim=1)
    return ((lum - lo[:, None, None, None]) / (hi - lo).clamp_min(0.05)[:, None, None, None]).clamp(0, 1)


def _coords(h: int, w: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return ys / scale, xs / scale


def _directional_blur(lum: torch.Tensor, length: int, angle: float) -> torch.Tensor:
    """A line kernel of `length` px at `angle`: tones dragged as brush strokes drag paint."""
    size = 2 * length + 1
    ys, xs = _coords(size, size, 1.0)
    ys, xs = ys - length, xs - length
    dist = (xs * math.sin(angle) - ys * math.cos(angle)).abs()  # distance from the line through the centre
    kernel = (dist < 0.6).float() * ((xs ** 2 + ys ** 2) <= length ** 2).float()
    kernel = kernel / kernel.sum()
    return F.conv2d(F.pad(lum, (length,) * 4, mode="replicate"), kernel[None, None])


def _dither(style: Style, shape, scale: float, gen: torch.Generator) -> torch.Tensor:
    """The style's threshold pattern in [-0.5, 0.5] (1 x 1 x h x w, or n x 1 x h x w for stipple)."""
    n, _, h, w = shape
    ys, xs = _coords(h, w, scale)
    p, a = style.period, style.angle
    if style.mark in ("hatching", "crosshatch"):
        pattern = torch.cos(2 * math.pi * (xs * math.cos(a) + ys * math.sin(a)) / p) / 2
        if style.mark == "crosshatch":
            pattern = torch.minimum(pattern, torch.cos(2 * math.pi * (xs * math.cos(a + math.pi / 2)
                                                                      + ys * math.sin(a + math.pi / 2)) / p) / 2)
        return pattern[None, None]
    if style.mark == "halftone":
        return ((torch.cos(2 * math.pi * xs / p) + torch.cos(2 * math.pi * ys / p)) / 4)[None, None]
    if style.mark == "stipple":
        return torch.rand(n, 1, h, w, generator=gen) - 0.5
    return torch.zeros(1, 1, h, w)  # flat, smear


def _edges(lum: torch.Tensor) -> torch.Tensor:
    """Binary edge map: Sobel magnitude above a per-image threshold (its 85th percentile, at least 0.25)."""
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    gx = F.conv2d(F.pad(lum, (1,) * 4, mode="replicate"), kx[None, None])
    gy = F.conv2d(F.pad(lum, (1,) * 4, mode="replicate"), kx.t()[None, None])
    mag = (gx ** 2 + gy ** 2).sqrt()
    thr = mag.flatten(1).quantile(0.85, dim=1).clamp_min(0.25)
    return (mag > thr[:, None, None, None]).float()


def render(style: Style, photos: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """`photos` (N x 3 x H x W in [0, 1]) painted in `style`, same shape, in [0, 1].

    tone = stretch(luminance) (blurred along the angle first for "smear"); the palette index is
    round(tone * (k - 1) + dither), with the mark's threshold pattern as the dither; then outlines.
    Marks are sized for 64 px; at other sizes their period scales with the image.
    """
    gen = gen or torch.Generator().manual_seed(SEED)
    n, _, h, w = photos.shape
    scale = max(h, w) / 64
    lum = _luminance(photos)
    if style.mark == "smear":
        lum = _directional_blur(lum, max(2, round(style.period * scale)), style.angle)
    tone = _stretch(lum)
    k = len(style.palette)
    level = tone * (k - 1) + _dither(style, photos.shape, scale, gen)
    index = level.round().clamp(0, k - 1).long()
    palette = torch.tensor(style.palette, dtype=torch.float32)  # k x 3
    out = palette[index[:, 0]].permute(0, 3, 1, 2)  # N x 3 x H x W
    if style.edge != "none":
        edges = _edges(_luminance(photos))
        colour = palette[0 if style.edge == "ink" else -1][None, :, None, None]
        out = out * (1 - edges) + colour * edges
    return out.contiguous()


# --------------------------------------------------------------------------- datasets


def style_crops(styles, n: int, size: int, crops, gen: torch.Generator) -> tuple[torch.Tensor, list[int], list[int]]:
    """n renders at size x size: a random style of `styles` on a random crop from `crops` (a PhotoCrops);
    (images, style index of each, photo index of each)."""
    which = torch.randint(0, len(styles), (n,), generator=gen).tolist()
    content, photo = crops.sample(n, size)
    out = torch.stack([render(styles[i], content[j : j + 1], gen)[0] for j, i in enumerate(which)])
    return out, which, photo


# content the mimics' artists paint: photos never used to train any built-in (photos.HELD_OUT) and,
# for tests and benchmarks that must not see the mimic's training content, a second set
ARTIST_PHOTOS = ("rocket", "motorcycle")
JUDGE_PHOTOS = ("coffee", "chelsea", "astronaut")  # references of the style score (content unlike the artist's)


def artist_images(style: Style, n: int, size: int = 64, seed: int = SEED, photos=ARTIST_PHOTOS) -> list[np.ndarray]:
    """n images of one "artist": `style` on random crops of `photos`, uint8 H x W x 3 (what a mimic trains on)."""
    content = PhotoCrops(photos, seed).sample(n, size)[0]
    painted = render(style, content, torch.Generator().manual_seed(seed + 11))
    return from_batch(painted)  # rendered in [0, 1]


def contact_sheet(styles=STYLES, per_style: int = 6, size: int = 64, zoom: int = 2, seed: int = SEED) -> np.ndarray:
    """Every style as a labelled row of renders (uint8): training styles, a gap, the held-out ones."""
    from PIL import Image, ImageDraw

    label_w, cell = 240, size * zoom
    rows = []
    for i, style in enumerate(styles):
        if i == N_TRAIN:
            gap = Image.new("RGB", (label_w + per_style * cell, 28), "white")
            ImageDraw.Draw(gap).text((4, 8), "held out (the artists no built-in saw):", fill="black")
            rows.append(np.asarray(gap))
        renders = np.concatenate(artist_images(style, per_style, size, seed, photos=ARTIST_PHOTOS + JUDGE_PHOTOS), 1)
        renders = np.kron(renders, np.ones((zoom, zoom, 1), np.uint8))
        label = Image.new("RGB", (label_w, cell), "white")
        draw = ImageDraw.Draw(label)
        draw.text((4, cell // 2 - 14), style.name, fill="black")
        draw.text((4, cell // 2 + 2), f"{style.family}, {style.mark}, {style.edge} edges", fill=(90, 90, 90))
        rows.append(np.concatenate([np.asarray(label), renders], 1))
    return np.concatenate(rows, 0)


if __name__ == "__main__":  # python -m pipeline.data.styles docs/style_world.png
    import sys

    from PIL import Image

    Image.fromarray(contact_sheet()).save(sys.argv[1] if len(sys.argv) > 1 else "style_world.png")
