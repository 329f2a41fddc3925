"""Mimicry scenarios: what a would-be copier does with (protected) images.

- `sdedit`: image-to-image edits at several strengths (one-step x0 prediction, multi-step DDIM).
- `inpaint`: repaint masked regions with an inpainting model (masks from metadata or generated).
- `textual_inversion`: learn one new token per group of images, generate from it.
- `lora`: fine-tune LoRA adapters of the UNet per group, generate with them.
- `dreambooth`: fine-tune a copy of the whole UNet per group with prior preservation, generate with it.

Each is usable alone (a class loaded once with a model directory, `run(...)` -> `MimicOutput`)
and as a stage of the Ray evaluation (`pipeline.evaluate.run`). All run the same on CPU and GPU.
"""

from pipeline.evaluate.mimic.common import MimicOutput
from pipeline.evaluate.mimic.dreambooth import DreamBooth, DreamBoothConfig
from pipeline.evaluate.mimic.inpaint import Inpaint, InpaintConfig
from pipeline.evaluate.mimic.lora import Lora, LoraConfig
from pipeline.evaluate.mimic.sdedit import SDEdit, SDEditConfig
from pipeline.evaluate.mimic.textual_inversion import (
    TextualInversion,
    TextualInversionConfig,
)

PER_IMAGE_SCENARIOS = ("sdedit", "inpaint")
TRAINING_SCENARIOS = ("textual_inversion", "lora", "dreambooth")
SCENARIOS = PER_IMAGE_SCENARIOS + TRAINING_SCENARIOS
# what `evaluate` runs unless told: DreamBooth (a full UNet copy per group) is asked for by name
DEFAULT_SCENARIOS = ("sdedit", "inpaint", "textual_inversion", "lora")

__all__ = [
    "MimicOutput", "SDEdit", "SDEditConfig", "Inpaint", "InpaintConfig", "TextualInversion",
    "TextualInversionConfig", "Lora", "LoraConfig", "DreamBooth", "DreamBoothConfig", "SCENARIOS", "DEFAULT_SCENARIOS", "PER_IMAGE_SCENARIOS", "TRAINING_SCENARIOS",
]
