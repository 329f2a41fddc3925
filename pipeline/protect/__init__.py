"""Protection methods and the engine that runs them.

`build_protector(models, config)` is the one way to get a protector for a method name:
gradient methods (methods.py) run through the PGD engine (engine.py); `fastprotect` and
`fastprotect+pgd` (pre-trained perturbations, pipeline/fastprotect/) offer the same interface.
"""

from __future__ import annotations

from ..models import DiffusionModels
from .engine import ALL_METHODS, FASTPROTECT_METHODS, ProtectConfig, Protector


def build_protector(models: DiffusionModels, config: ProtectConfig) -> Protector:
    """A protector for `config.method` with `models` loaded (`config` validated the method).

    ``build_protector(load_models("tiny"), ProtectConfig(method="sds-", eps=16)).protect(images, keys)``
    returns one float H x W x 3 perturbation (pixel units, within eps) per uint8 H x W x 3 image.
    """
    if config.method in FASTPROTECT_METHODS:
        from ..fastprotect.infer import build_fastprotector  # imports this package: load lazily

        return build_fastprotector(models, config)
    return Protector(models, config)


__all__ = ["ALL_METHODS", "FASTPROTECT_METHODS", "ProtectConfig", "Protector", "build_protector"]
