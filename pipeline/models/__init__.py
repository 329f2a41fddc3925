"""Diffusion models: what to load (`ModelSpec`), loading, the diffusion maths, built-in models.

- `loading`    `ModelSpec` (what to load, where, in which dtype), model resolution (`resolve_model_path`,
               `pretrained_source`, inpainting twins), `load_models(spec)` -> `DiffusionModels`
- `diffusion`  the noising rule and training targets (eps, v, sample), text conditioning, the denoising
               loss, SDXL micro-conditioning
- `hub`        is a hub model reachable (one short request)?
- `devices`    `--device` checked before Ray starts
- `builtin/`   the built-in models (configs, build, training, shipped weights)

The public API is re-exported here: ``from pipeline.models import load_models, ModelSpec``.
"""

from pipeline import lazy
from pipeline.models.names import DEFAULT_MODEL

# on first use (pipeline/lazy.py): loading imports torch and diffusers
__getattr__ = lazy.exports(__name__, {name: "pipeline.models.loading" for name in (
    "DTYPES", "DiffusionModels", "ModelLoadError", "ModelSpec", "load_ensemble", "load_models")})

__all__ = ["DEFAULT_MODEL", "DTYPES", "DiffusionModels", "ModelLoadError", "ModelSpec", "load_ensemble", "load_models"]
