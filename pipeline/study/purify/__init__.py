"""Purifications: what an attacker does to a protected image before mimicking it.

One small unit per purification (a module each, its docstring naming the source and the
parameter). A purification is named by a spec ``NAME``, ``NAME:PARAM`` or, for one that takes an
option (cat's protection method), ``NAME:PARAM:OPTION``::

    none             the image as it is
    jpeg:75          JPEG at quality 75 (Pillow)                       lower Q: stronger
    resize:2         down by a factor 2, back up (Pillow, bicubic)     larger F: stronger
    noise:0.05       Gaussian noise, sigma in [0, 1] units             larger: stronger
    blur:1           Gaussian blur, sigma in pixels (torchvision)      larger: stronger
    quantize:4       keep 4 bits per channel                           fewer: stronger
    tvm:0.05         total-variation minimisation (scikit-image)       larger: stronger
    diffpure:0.1     noise the latent to t = 0.1 T, denoise (DDIM)     larger: stronger
    impress:50       IMPRESS consistency optimisation, 50 steps        more: stronger
    noisy_upscale:0.1  noise, down x4, diffusers x4 upscaler           larger: stronger
    gridpure:0.01    GrIDPure: diffpure on overlapping grids, iterated  larger: stronger
    pdmpure:0.1      SDEdit with a pixel-space DDPM to t = 0.1 T        larger: stronger
    cat:100          CAT: 100 steps of LoRA in the VAE encoder         more: stronger
    cat:100:sds-     ... trained on the attacker's own sds- perturbations

Every purification maps uint8 H x W x 3 images to uint8 images of the same size, and is
deterministic given (seed, key): the protected and the clean copy of an image get the same
noise. `parse_purification("jpeg:75")` gives the unit; `apply(images, keys, seed, context)`
runs it. Model-based ones (``needs_model``) use a `PurifyContext` (the mimic's model, the
upscaler) loaded once per Ray actor; the others run in plain Ray tasks.

A *model-side* attack (``adapts_model``: `cat`) leaves the image as it is and adapts the mimic's
model instead: `adaptation(context, seed)` trains it once per study (tensors, committed to
OUTPUT/adapters/), and `adapted(vae, tensors)` applies it while a cell's mimic runs (cat.py).

The base class `Purification` and `PurifyContext` live in base.py (the units import them from there; this
module loads a unit by name, so a unit importing this module would be an import cycle).
"""

from __future__ import annotations

import importlib
import math

from pipeline.study.purify.base import Purification, PurifyContext

# name -> (module, default parameter); the module defines one `Purification` subclass `UNIT`
REGISTRY: dict[str, tuple[str, float | None]] = {
    "none": ("none", None),
    "jpeg": ("jpeg", 75.0),
    "resize": ("resize", 2.0),
    "noise": ("noise", 0.05),
    "blur": ("blur", 1.0),
    "quantize": ("quantize", 4.0),
    "tvm": ("tvm", 0.05),
    "diffpure": ("diffpure", 0.1),
    "impress": ("impress", 50.0),
    "noisy_upscale": ("noisy_upscale", 0.1),
    "gridpure": ("gridpure", 0.01),
    "pdmpure": ("pdmpure", 0.1),
    "cat": ("cat", 100.0),
}


def parse_purification(spec: str) -> Purification:
    """`NAME`, `NAME:PARAM` or `NAME:PARAM:OPTION` -> the purification unit (ValueError with the choices otherwise)."""
    text = spec.strip()
    name, _, rest = text.partition(":")
    value, _, option = rest.partition(":")
    name = name.strip().lower()
    if name not in REGISTRY:
        raise ValueError(f"unknown purification {spec!r}; choose from {', '.join(REGISTRY)} (e.g. jpeg:75)")
    module, default = REGISTRY[name]
    if value.strip():
        if default is None:
            raise ValueError(f"purification {name!r} takes no parameter, got {spec!r}")
        try:
            param = float(value)
        except ValueError:
            raise ValueError(f"purification {spec!r}: {value!r} is not a number") from None
        if not math.isfinite(param):
            raise ValueError(f"purification {spec!r}: the parameter must be finite")
    else:
        param = default
    unit = importlib.import_module(f"{__name__}.{module}").UNIT
    option = option.strip() or None
    if option is not None and unit.option_default is None:
        raise ValueError(f"purification {name!r} takes no option after its parameter, got {spec!r}")
    return unit(param, option)


def parse_purifications(text: str | list[str] | tuple[str, ...]) -> list[Purification]:
    """A comma-separated list (or a list) of specs -> units, duplicates refused."""
    specs = [s for s in (text.split(",") if isinstance(text, str) else text) if str(s).strip()]
    units = [parse_purification(str(s)) for s in specs]
    names = [u.spec for u in units]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"purification(s) listed twice: {', '.join(dupes)}")
    return units


__all__ = ["REGISTRY", "Purification", "PurifyContext", "parse_purification", "parse_purifications"]
