"""`tiny-upscaler`: a small diffusers x4 upscaler with random weights, for tests and the demo.

Same architecture as `stabilityai/stable-diffusion-x4-upscaler` (`StableDiffusionUpscalePipeline`:
a 7-channel UNet taking [z_t, low-res image] with the noise level as class label, a VAE whose
latent is 1/4 of the output, a CLIP text encoder, DDPM low-res noise scheduler, DDIM sampler),
with few channels. Random weights: its output is not an upscaled image, it only exercises the
`noisy_upscale` code path without a download. Built once, seeded, under
`$MIMICSHIELD_CACHE/models/tiny-upscaler-v1` (separate from models/builtin/build.py on purpose).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.models.builtin.build import (
    build_tokenizer,
    cached_pipeline_dir,
    models_cache_dir,
)
from pipeline.seeds import seeded_global_rng

NAME = "tiny-upscaler"
VERSION = "v1"
SEED = 0


def _build():
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    with seeded_global_rng(SEED):
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                            up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 32],
                            layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
                            scaling_factor=0.08333)
        unet = UNet2DConditionModel(in_channels=7, out_channels=4,
                                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[32, 64],
                                    layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                                    norm_num_groups=8, sample_size=16, num_class_embeds=1000)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    low_res = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
    sampler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0001,
                            beta_end=0.02, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          low_res_scheduler=low_res, scheduler=sampler, max_noise_level=350)


def builtin_upscaler_path() -> Path:
    """Directory of the built-in upscaler (diffusers format), generated on first use."""
    return cached_pipeline_dir(models_cache_dir() / f"{NAME}-{VERSION}", _build, NAME)
