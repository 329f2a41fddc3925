"""Built-in models for tests, benchmarks and the demo (nothing is downloaded).

- `build`     the configs, `builtin_model_path(name)` (built once into the cache, then loaded through
              `from_pretrained` like any checkpoint) and the shipped weights of the trained built-ins, with
              their recipes (`pipeline/train/`, the scripts that made them, is not part of the runtime)
- `pixel`     `tiny-pixel`, a pixel-space DDPM for the study's `pdmpure` (its own config and weights)
"""
