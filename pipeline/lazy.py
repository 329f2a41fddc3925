"""Package re-exports imported on first use (PEP 562 module ``__getattr__``).

A package's ``__init__`` that re-exports its classes would import torch, diffusers and Ray whenever anything under
it is imported; the command line builds its parsers from names alone (`pipeline/protect/names.py`, ...) and must
answer ``--help`` at once. So the heavy re-exports are declared, not imported:

    __getattr__ = lazy.exports(__name__, {"ProtectConfig": "pipeline.protect.engine", ...})

``from pipeline.protect import ProtectConfig`` then imports `pipeline.protect.engine` at that moment, as before.
"""

from __future__ import annotations

import importlib


def exports(package: str, names: dict[str, str]):
    """A module ``__getattr__`` for `package` giving each name in `names` from the module it maps to."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name]), name)

    return __getattr__
