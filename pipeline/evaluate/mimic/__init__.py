"""Mimicry scenarios: what a would-be copier does with (protected) images.

- `sdedit`: image-to-image edits at several strengths (one-step x0 prediction, multi-step DDIM).
- `inpaint`: repaint masked regions with an inpainting model (masks from metadata or generated).
- `textual_inversion`: learn one new token per group of images, generate from it.
- `lora`: fine-tune LoRA adapters of the UNet per group, generate with them.
- `dreambooth`: fine-tune a copy of the whole UNet per group with prior preservation, generate with it.

Each is usable alone (a class loaded once with a model directory, `run(...)` -> `MimicOutput`)
and as a stage of the Ray evaluation (`pipeline.evaluate.run`). All run the same on CPU and GPU.
"""

from pipeline import lazy

# the mimics import torch and diffusers: on first use (pipeline/lazy.py), so the scenario names below cost nothing
__getattr__ = lazy.exports(__name__, {
    "MimicOutput": "pipeline.evaluate.mimic.common",
    "DreamBooth": "pipeline.evaluate.mimic.dreambooth", "DreamBoothConfig": "pipeline.evaluate.mimic.dreambooth",
    "Inpaint": "pipeline.evaluate.mimic.inpaint", "InpaintConfig": "pipeline.evaluate.mimic.inpaint",
    "Lora": "pipeline.evaluate.mimic.lora", "LoraConfig": "pipeline.evaluate.mimic.lora",
    "SDEdit": "pipeline.evaluate.mimic.sdedit", "SDEditConfig": "pipeline.evaluate.mimic.sdedit",
    "TextualInversion": "pipeline.evaluate.mimic.textual_inversion",
    "TextualInversionConfig": "pipeline.evaluate.mimic.textual_inversion",
})

PER_IMAGE_SCENARIOS = ("sdedit", "inpaint")
TRAINING_SCENARIOS = ("textual_inversion", "lora", "dreambooth")
SCENARIOS = PER_IMAGE_SCENARIOS + TRAINING_SCENARIOS
# what `evaluate` runs unless told: DreamBooth (a full UNet copy per group) is asked for by name
DEFAULT_SCENARIOS = ("sdedit", "inpaint", "textual_inversion", "lora")

__all__ = [
    "MimicOutput", "SDEdit", "SDEditConfig", "Inpaint", "InpaintConfig", "TextualInversion",
    "TextualInversionConfig", "Lora", "LoraConfig", "DreamBooth", "DreamBoothConfig", "SCENARIOS", "DEFAULT_SCENARIOS", "PER_IMAGE_SCENARIOS", "TRAINING_SCENARIOS",
]
