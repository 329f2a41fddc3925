"""Diffusion models: what to load (`ModelSpec`), loading, the diffusion maths, built-in models.

- `spec`       `ModelSpec`, devices and dtypes, model ids and paths (hub id, local dir, built-in)
- `loading`    `load_models(spec)` -> `DiffusionModels` (VAE, UNet, text encoders, scheduler)
- `diffusion`  the noising rule and training targets (eps, v, sample) and SDXL micro-conditioning
- `hub`        is a hub model reachable (one short request)?
- `devices`    `--device` checked before Ray starts
- `builtin/`   the built-in models (configs, build, training, shipped weights)

The public API is re-exported here: ``from pipeline.models import load_models, ModelSpec``.
"""

from pipeline.models.loading import (
    DEFAULT_MODEL,
    DTYPES,
    DiffusionModels,
    ModelLoadError,
    ModelSpec,
    load_ensemble,
    load_models,
)

__all__ = ["DEFAULT_MODEL", "DTYPES", "DiffusionModels", "ModelLoadError", "ModelSpec", "load_ensemble", "load_models"]
