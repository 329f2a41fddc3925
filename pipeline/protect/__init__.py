"""Protection methods and the engine that runs them.

`build_protector(models, config)` is the one way to get a protector for a method name:
gradient methods (methods.py) run through the PGD engine (engine.py); `fastprotect` and
`fastprotect+pgd` (pre-trained perturbations, pipeline/protect/fastprotect/) and `aspl` (a group's images
together against a fine-tuned surrogate, aspl.py) offer the same interface.

`models` may be a list of loaded models (an ensemble, ``--model A,B``): gradient methods then
sum the per-model directions (engine.py). FastProtect refuses an ensemble: a bank is trained
against one encoder (its fingerprint is checked), so an ensemble bank would have to be trained
against all of them, which `train-fastprotect` does not do; protect with one model, or use a
gradient method (e.g. ``sds-``) for the ensemble.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline import lazy
from pipeline.protect.names import ALL_METHODS, FASTPROTECT_METHODS, GROUP_METHODS

if TYPE_CHECKING:
    from pipeline.models.loading import DiffusionModels
    from pipeline.protect.engine import ProtectConfig, Protector

# the classes import torch: on first use (pipeline/lazy.py), so that the names above cost nothing
__getattr__ = lazy.exports(__name__, {"ProtectConfig": "pipeline.protect.engine", "Protector": "pipeline.protect.engine"})


def check_ensemble_method(method: str, n_models: int) -> None:
    """FastProtect banks belong to one model: refuse an ensemble with a message saying what to do."""
    if n_models > 1 and method in GROUP_METHODS:
        raise ValueError(f"--method {method} cannot protect against an ensemble of {n_models} models: its surrogate "
                         "is a fine-tuned copy of one model. Give one --model")
    if n_models > 1 and method in FASTPROTECT_METHODS:
        raise ValueError(
            f"--method {method} cannot protect against an ensemble of {n_models} models: a FastProtect bank "
            "is trained against one model's encoder. Use one --model with fastprotect, or a gradient method "
            "(sds-, advdm, ...) with --model A,B"
        )


def build_protector(models: DiffusionModels | Sequence[DiffusionModels], config: ProtectConfig) -> Protector:
    """A protector for `config.method` with `models` loaded (one model, or a list: an ensemble).

    ``build_protector(load_models("tiny"), ProtectConfig(method="sds-", eps=16)).protect(images, keys)``
    returns one float H x W x 3 perturbation (pixel units, within eps) per uint8 H x W x 3 image.
    `config` validated the method when it was built.
    """
    from pipeline.models.loading import DiffusionModels
    from pipeline.protect.engine import Protector
    from pipeline.protect.fastprotect.infer import build_fastprotector

    if not isinstance(models, DiffusionModels):
        models = list(models)
        check_ensemble_method(config.method, len(models))
        if len(models) == 1:
            models = models[0]
    if config.method in FASTPROTECT_METHODS:
        return build_fastprotector(models, config)
    if config.method in GROUP_METHODS:
        from pipeline.protect.aspl import ASPLProtector

        return ASPLProtector(models, config)
    return Protector(models, config)


__all__ = ["ALL_METHODS", "FASTPROTECT_METHODS", "GROUP_METHODS", "ProtectConfig", "Protector", "build_protector",
           "check_ensemble_method"]
