"""Expectation over transformation (EOT): protections made to survive purifications.

Athalye et al., "Synthesizing robust adversarial examples" (ICML 2018). Each PGD step averages
the method's direction over K transforms T_k drawn at random from a family of differentiable
transforms, pulled back to the image through each transform's Jacobian:

    d(x) = 1/K sum_k  J_{T_k}(x)^T  d_method(T_k(x))

so the perturbation is optimised for the mimic's view of the image *after* the purification.
`protect --eot jpeg:50-95,resize:0.5-1,noise:0-0.05 --eot-samples K`: each of the K samples
picks one listed transform uniformly and its parameter uniformly in the range given:

    jpeg:QMIN-QMAX     differentiable JPEG at quality Q (kornia's `jpeg_codec_differentiable`)
    resize:SMIN-SMAX   bilinear down to scale S of each side (0 < S <= 1), back up (antialiased)
    noise:SMIN-SMAX    additive Gaussian noise, sigma in [0, 1] units
    none               the identity (mix clean steps in)

A single value (`jpeg:75`) is a range of width zero. Draws are per sample, from the run seed
and the sample's key, so a sample gets the same transforms whatever batch it lands in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.seeds import key_seed

Transform = Callable[[torch.Tensor], torch.Tensor]  # B x 3 x H x W in [0, 1] -> same shape

RANGES = {"jpeg": (1.0, 100.0), "resize": (1e-3, 1.0), "noise": (0.0, 1.0), "none": None}
DEFAULT_EOT = "jpeg:50-95,resize:0.5-1,noise:0-0.05"


@dataclass(frozen=True)
class EOTTransform:
    """One family of the EOT spec with its parameter range."""

    name: str
    low: float = 0.0
    high: float = 0.0


def parse_eot(spec: str) -> tuple[EOTTransform, ...]:
    """`jpeg:50-95,resize:0.5-1,noise:0-0.05` -> transforms (ValueError naming the problem)."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, rng = part.partition(":")
        name = name.strip().lower()
        if name not in RANGES:
            raise ValueError(f"unknown EOT transform {part!r}; choose from {', '.join(RANGES)} (e.g. jpeg:50-95)")
        if name == "none":
            out.append(EOTTransform("none"))
            continue
        lo_text, _, hi_text = rng.partition("-")
        try:
            low = float(lo_text)
            high = float(hi_text) if hi_text.strip() else low
        except ValueError:
            raise ValueError(f"EOT transform {part!r}: expected {name}:MIN-MAX") from None
        lo_ok, hi_ok = RANGES[name]
        if not lo_ok <= low <= high <= hi_ok:
            raise ValueError(f"EOT transform {part!r}: need {lo_ok:g} <= MIN <= MAX <= {hi_ok:g}")
        out.append(EOTTransform(name, low, high))
    if not out:
        raise ValueError(f"empty EOT spec {spec!r}")
    return tuple(out)


# ---------------------------------------------------------------- differentiable transforms


def jpeg(x: torch.Tensor, quality: float) -> torch.Tensor:
    """Differentiable JPEG (kornia), padded to the 16 x 16 MCU grid it needs, then cropped."""
    from kornia.enhance import jpeg_codec_differentiable

    h, w = x.shape[2:]
    padded = F.pad(x, (0, -w % 16, 0, -h % 16), mode="replicate")
    q = torch.full((x.shape[0],), float(quality), device=x.device, dtype=x.dtype)
    return jpeg_codec_differentiable(padded, q)[:, :, :h, :w]


def resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear down to `scale` of each side (antialiased), back up to the input's size."""
    h, w = x.shape[2:]
    small = (max(1, round(h * scale)), max(1, round(w * scale)))
    if small == (h, w):
        return x
    down = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)


def make_transform(t: EOTTransform, value: float, noise: torch.Tensor | None = None) -> Transform:
    """The transform of family `t` at parameter `value` (`noise`: N(0, 1), for `noise`)."""
    if t.name == "jpeg":
        return lambda x: jpeg(x, value)
    if t.name == "resize":
        return lambda x: resize(x, value)
    if t.name == "noise":
        return lambda x: x + value * noise.to(x.device, x.dtype)
    return lambda x: x


def rowwise(per_row: list[Transform]) -> Transform:
    """One transform per batch row, applied row by row (each row has its own parameters)."""
    return lambda x: torch.cat([f(x[i : i + 1]) for i, f in enumerate(per_row)])


# ---------------------------------------------------------------- the EOT direction


def eot_direction(method, models, x: torch.Tensor, inputs, transforms: list[Transform]) -> torch.Tensor:
    """1/K sum_k J_{T_k}(x)^T d(T_k(x)): the method's direction averaged over the transforms.

    `x` requires grad. Each direction is taken at the transformed image and pulled back to `x`
    by a vector-Jacobian product, so for a loss-gradient method this is exactly the mean of
    grad_x L(T_k(x)) (tested).
    """
    total = torch.zeros_like(x)
    for transform in transforms:
        xt = transform(x)
        d = method.direction(models, xt, inputs)
        if xt is x:
            total += d
        else:
            (g,) = torch.autograd.grad(xt, x, grad_outputs=d.to(xt.dtype))
            total += g
    return total / len(transforms)


class EOTSampler:
    """Draws the K transforms of each PGD step, per sample (seeded by the run seed and its key)."""

    def __init__(self, spec: str, samples: int, seed: int, keys: list[str]):
        self.transforms = parse_eot(spec)
        self.samples = samples
        self.gens = [torch.Generator().manual_seed(key_seed(seed, k, "eot")) for k in keys]

    def draw(self, shape: tuple[int, ...]) -> list[Transform]:
        """K batch transforms for one step; `shape` is one image's (3, H, W)."""
        out = []
        for _ in range(self.samples):
            per_row = []
            for g in self.gens:
                t = self.transforms[int(torch.randint(len(self.transforms), (1,), generator=g))]
                u = float(torch.rand((), generator=g))
                value = t.low + (t.high - t.low) * u
                noise = torch.randn((1, *shape), generator=g) if t.name == "noise" else None
                per_row.append(make_transform(t, value, noise))
            out.append(rowwise(per_row))
        return out

    def direction(self, method, models, x: torch.Tensor, inputs) -> torch.Tensor:
        return eot_direction(method, models, x, inputs, self.draw(tuple(x.shape[1:])))


