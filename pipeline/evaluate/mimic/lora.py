"""LoRA mimicry: fine-tune low-rank adapters of the UNet (and text encoder) on a group's images, then generate.

For each group, peft LoRA adapters (rank r, alpha = r) are added to the UNet's attention
projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and, unless ``text_encoder_rank=0``, to the
text encoder's (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``; both encoders for SDXL), as kohya's
and diffusers' LoRA scripts allow: W' = W + B A with A: d x r, B: r x d, B initialised so that
W' = W at the start; only A and B are trained, with the denoising loss

    L = E_{z, t, eps} || f_theta'(z_t, t, c) - y_t ||^2,  c = "a painting in the style of sks"

(y_t = eps or v: training.py). With probability ``caption_dropout`` a step's prompt is "" instead
(caption dropout, as in kohya's ``caption_dropout_rate``): the unconditional prediction learns the
style too. Without it, classifier-free guidance (eps_u + w (eps_c - eps_u), w = 7.5) amplifies the
base model's own reading of the prompt, and on ``tiny-style`` the mimic painted the base model's idea
of "sks" for half the artists (benchmarks/README.md, style mimicry).

The adapters are saved with the pipeline class's own ``save_lora_weights`` (StableDiffusionPipeline
or StableDiffusionXLPipeline; a ``pytorch_lora_weights.safetensors`` file, diffusers key names) and
generation loads them back with ``load_lora_weights``, the path any user of the saved file would take.

Flow models (SD3, FLUX): the adapters go on the transformer's attention projections (the same four
names, as diffusers' train_dreambooth_lora_{sd3,flux}.py default to), trained on the velocity loss
(training.py), saved as ``transformer_lora_layers`` by StableDiffusion3Pipeline / FluxPipeline.

Defaults are small so that a group trains in seconds on the built-in ``tiny`` model. Real use
(SD 1.5, 512 px; FastProtect's main evaluation): rank 4-16, about 500-1000 steps at lr 1e-4,
batch 1-4, 50 inference steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.evaluate.mimic.common import denoiser, is_flow_pipeline
from pipeline.evaluate.mimic.training import (
    MimicTrainingConfig,
    TrainingMimic,
    encode_latents,
    group_seed,
    train_denoiser,
    training_parts,
)
from pipeline.seeds import seeded_global_rng

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP attention
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class LoraConfig(MimicTrainingConfig):
    rank: int = 4
    learning_rate: float = 1e-3
    token: str = "sks"  # a rare word standing for the group's style
    train_template: str = "a painting in the style of {token}"
    targets: tuple[str, ...] = LORA_TARGETS
    text_encoder_rank: int = 4  # LoRA in the text encoder(s) too, as kohya's and diffusers' scripts allow; 0: UNet only
    caption_dropout: float = 0.3  # share of training prompts replaced by "" (the unconditional prompt)


class Lora(TrainingMimic):
    """Trains one LoRA per group and generates with it; the base model is loaded once."""

    scenario = "lora"
    config_class = LoraConfig

    @property
    def setting(self) -> str:
        return f"rank={self.config.rank}/steps={self.config.steps}"

    def train(self, images: list[np.ndarray], group: str, save_dir: str | Path) -> Path:
        """Train adapters on `images`, save them under `save_dir`; returns the safetensors file."""
        import peft
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        cfg, unet = self.config, denoiser(self.pipe)  # the UNet, or a flow model's transformer
        adapter = "mimic_train"
        # Text-encoder adapters go on copies of the encoders (dropped after training), so the pipeline's own
        # encoders stay the base model's for the next group; the copies are what the saved file describes.
        # Flow models (SD3, FLUX): transformer adapters only, as diffusers' DreamBooth-LoRA scripts default to.
        flow = is_flow_pipeline(self.pipe)
        text_lora = bool(cfg.text_encoder_rank) and not flow
        encoders = {"text_encoder": self.pipe.text_encoder, "text_encoder_2": getattr(self.pipe, "text_encoder_2", None)}
        with seeded_global_rng(group_seed(cfg.seed, group)):  # peft's init of A draws from the global generator
            unet.add_adapter(peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                                             target_modules=list(cfg.targets)), adapter_name=adapter)
            if text_lora:
                encoders = {name: None if enc is None else peft.inject_adapter_in_model(
                    peft.LoraConfig(r=cfg.text_encoder_rank, lora_alpha=cfg.text_encoder_rank,
                                    init_lora_weights="gaussian", target_modules=list(TEXT_LORA_TARGETS)),
                    copy.deepcopy(enc), adapter_name=adapter) for name, enc in encoders.items()}
        try:
            trained = [unet] + [enc for enc in encoders.values() if enc is not None and text_lora]
            params = [p for module in trained for p in module.parameters() if p.requires_grad]
            for p in params:
                p.data = p.data.float()  # trainable weights in fp32 whatever the model's dtype
            parts = training_parts(self.pipe, unet, self.train_scheduler, **encoders)
            latents = encode_latents(self.pipe, images, self.resolution)
            prompt = cfg.train_template.format(token=cfg.token)

            def prompts(rng, n):  # caption dropout: some steps teach the unconditional prediction the style
                return ["" if rng.random() < cfg.caption_dropout else prompt for _ in range(n)]

            for module in trained:
                module.train()
            train_denoiser(parts, latents, prompts, params, steps=cfg.steps,
                           learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
                           seed=group_seed(cfg.seed, group), text_grad=text_lora,
                           resolution=self.resolution)
            unet.eval()
            layers_name = "transformer_lora_layers" if flow else "unet_lora_layers"
            layers = {layers_name: get_peft_model_state_dict(unet, adapter_name=adapter)}
            if text_lora:
                for name, enc in encoders.items():
                    if enc is not None:
                        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(enc, adapter_name=adapter)
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            type(self.pipe).save_lora_weights(
                str(save_dir), weight_name=LORA_FILE, safe_serialization=True,
                **{key: convert_state_dict_to_diffusers(state) for key, state in layers.items()})
        finally:
            unet.delete_adapters(adapter)
            unet.requires_grad_(False)
        return Path(save_dir) / LORA_FILE

    def generate(self, lora_file: str | Path, group: str) -> list[np.ndarray]:
        """Images from the prompt template with the adapters loaded by `load_lora_weights`."""
        cfg = self.config
        lora_file = Path(lora_file)
        self.pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="mimic")
        try:
            return self.generate_for(cfg.prompt_template.format(token=cfg.token), group)
        finally:
            self.pipe.unload_lora_weights()
