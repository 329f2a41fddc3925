"""Evaluation: mimic protected images and their clean originals, measure the gap.

- `settings`  `EvalSettings` (holds a `ModelSpec` and the mimic and metric configs)
- `run`       `run_evaluation(settings)`: pairing by key, the evaluation actors, the tables
- `report`    `OUTPUT/report.html` and the terminal summary
- `mimic/`    the mimics: SDEdit, inpainting, textual inversion, LoRA
"""
