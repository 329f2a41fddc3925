"""The scripts that made the built-in models' shipped weights (CPU, seeded); never imported by the runtime.

- `tiny`   tiny's VAE, UNet and inpainting UNet (`python -m pipeline.train.tiny --out DIR`; build.WEIGHTS_RECIPE)
- `style`  `tiny-style` on the style world (`python -m pipeline.train.style`; build.STYLE_WEIGHTS_RECIPE)
- `flow`   `tiny-sd3` and `tiny-flux` (`python -m pipeline.train.flow`; build.FLOW_WEIGHTS_RECIPE)
- `pixel`  `tiny-pixel`, the pixel-space DDPM of pdmpure (`python -m pipeline.train.pixel`; pixel.WEIGHTS_RECIPE)
- `curve`  the curve every script prints and writes to DIR/curve.jsonl

They sit beside `commands/`: they may import anything of `pipeline` (their optimisation loop is
`models/fitting.py: fit`, their data `pipeline/data/`); nothing in `pipeline/` imports them. What the runtime
needs of the built-ins (configs, shipped weights and their sha256, loading) lives in `models/builtin/`.
"""
