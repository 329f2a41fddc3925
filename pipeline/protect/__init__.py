"""Protection methods and the engine that runs them.

`build_protector(models, config)` is the one way to get a protector for a method name:
gradient methods (methods.py) run through the PGD engine (engine.py); `fastprotect` and
`fastprotect+pgd` (pre-trained perturbations, pipeline/fastprotect/) offer the same interface.
"""

from __future__ import annotations

from ..models import DiffusionModels
from .engine import ProtectConfig, Protector
from .methods import METHODS

FASTPROTECT_METHODS = ("fastprotect", "fastprotect+pgd")  # pipeline.fastprotect.infer
ALL_METHODS = tuple(METHODS) + FASTPROTECT_METHODS


def build_protector(models: DiffusionModels, config: ProtectConfig) -> Protector:
    """A protector for `config.method` with `models` loaded."""
    if config.method not in ALL_METHODS:
        raise ValueError(f"unknown method {config.method!r}; choose from {', '.join(ALL_METHODS)}")
    if config.method in FASTPROTECT_METHODS:
        from ..fastprotect.infer import build_fastprotector  # imports this package: load lazily

        return build_fastprotector(models, config)
    return Protector(models, config)


__all__ = ["ALL_METHODS", "ProtectConfig", "Protector", "build_protector"]
