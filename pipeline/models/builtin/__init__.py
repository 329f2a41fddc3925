"""Built-in models for tests, benchmarks and the demo (nothing is downloaded).

- `build`     the configs, `builtin_model_path(name)` (built once into the cache, then loaded through
              `from_pretrained` like any checkpoint) and the shipped weights of the trained `tiny`
- `training`  the script that trained those weights (`python -m pipeline.models.builtin.training`)
- `pixel`     `tiny-pixel`, a pixel-space DDPM for the study's `pdmpure` (its own config, training and weights)
"""
