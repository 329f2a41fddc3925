"""What every purification unit is (`Purification`) and what the model-based ones share (`PurifyContext`).

The units (one module each) subclass `Purification`; `pipeline.study.purify` loads them by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.seeds import key_seed


@dataclass
class PurifyContext:
    """What model-based purifications need, loaded lazily once per process (one per Ray actor)."""

    model: str = "tiny"  # the mimic's own model (diffpure, impress): built-in name, directory or hub id
    upscaler: str | None = None  # noisy_upscale: a diffusers x4 upscaler; None: the built-in tiny one
    device: str = "auto"
    dtype: str = "auto"
    upscaler_steps: int = 20  # denoising steps of the upscaler
    diffpure_steps: int = 20  # DDIM steps over the full schedule for diffpure, gridpure and pdmpure
    gridpure_iterations: int = 20  # GrIDPure's purification iterations (its paper's 20)
    pixel_model: str | None = None  # pdmpure: a diffusers DDPMPipeline / UNet2DModel directory; None: tiny-pixel
    attack: object | None = None  # cat: the study's ProtectConfig (steps, step size, seed); None: ProtectConfig()
    attack_eps: float = 16.0  # cat: the budget the attacker protects its own images with (the study's largest)
    _cache: dict = field(default_factory=dict, repr=False)

    def get(self, name: str, build):
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]


class Purification:
    """Base of every purification unit: `apply` maps uint8 images to uint8 images of the same size."""

    name: str = ""
    needs_model = False  # True: run in an actor pool with a PurifyContext
    adapts_model = False  # True: a model-side attack (the image is unchanged; the mimic's model is adapted)
    stronger = "larger"  # which way of the parameter is a stronger purification ("larger"/"smaller")
    option_default: str | None = None  # a unit taking NAME:PARAM:OPTION names its default option here

    def __init__(self, param: float | None, option: str | None = None):
        self.param = param
        self.option = option if option is not None else self.option_default
        self.check()

    def check(self) -> None:
        """Raise ValueError on an out-of-range parameter (or option)."""

    @property
    def spec(self) -> str:
        """The normalised spec: the parameter as %g, the option only when it is not the default."""
        text = self.name if self.param is None else f"{self.name}:{self.param:g}"
        return text if self.option == self.option_default else f"{text}:{self.option}"

    def apply(self, images: list[np.ndarray], keys: list[str], seed: int = 0,
              context: PurifyContext | None = None) -> list[np.ndarray]:
        return [self.one(img, key_seed(seed, k, f"purify:{self.spec}"), context) for img, k in zip(images, keys)]

    def one(self, rgb: np.ndarray, seed: int, context: PurifyContext | None) -> np.ndarray:
        raise NotImplementedError

    # a model-side attack (adapts_model) also defines these three
    def adaptation(self, context: PurifyContext, seed: int = 0) -> dict:
        """Train the adaptation once (deterministic in seed): name -> tensor."""
        raise NotImplementedError

    def adapted(self, vae, tensors: dict):
        """A context manager: `vae` carries the adaptation while it is open."""
        raise NotImplementedError

    def metadata(self, context: PurifyContext) -> dict[str, str]:
        """Strings recorded beside the adaptation's tensors."""
        return {"spec": self.spec}
