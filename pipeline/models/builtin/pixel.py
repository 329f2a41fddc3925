"""`tiny-pixel`: a small *pixel-space* DDPM trained on scikit-image's bundled photos, for PDM-Pure.

A diffusers `DDPMPipeline` (a `UNet2DModel` and a `DDPMScheduler`): the UNet predicts the noise eps of

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,        x_0 in [-1, 1] pixels, t in [0, 1000)

(Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020, Algorithm 1: the loss
|| eps - eps_theta(x_t, t) ||^2, linear betas 1e-4 to 0.02 over 1000 steps). It has no attention, so it
is fully convolutional: trained on 32 px crops, it runs on an image of any size (sides padded to a
multiple of 4). What `pdmpure:T` purifies with when no pixel model of the user's is given
(`pipeline/study/purify/pdmpure.py`): it has learned what photo pixels look like at low noise, not
what a latent-diffusion encoder reacts to, which is the point of PDM-Pure.

Trained by `pipeline/train/pixel.py` (`python -m pipeline.train.pixel --out DIR`, the command in
WEIGHTS_RECIPE) on random crops of the training photos (data/photos.py TRAIN_PHOTOS), the held-out photos
never cropped for training.

The weights ship in ``weights/`` (fp16 safetensors, sha256 checked on load), and the model is saved once
in diffusers format under ``$MIMICSHIELD_CACHE/models/tiny-pixel-v1`` and loaded from there with
`from_pretrained`, like every built-in. Kept out of build.py on purpose (as builtin_upscaler.py is).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.models.builtin.build import (
    WEIGHTS_DIR,
    cached_pipeline_dir,
    models_cache_dir,
    sha256,
)
from pipeline.seeds import seeded_global_rng

NAME = "tiny-pixel"
VERSION = "v1"
SEED = 0
UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32, 64),
            down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, norm_num_groups=8)
MULTIPLE = 4  # image sides must be a multiple of this: two downsamplings
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                 prediction_type="epsilon", clip_sample=True)  # DDPM's own schedule; x0 clipped to [-1, 1]

WEIGHTS_NAME = "tiny-pixel-v1.safetensors"
WEIGHTS_RECIPE = ("python -m pipeline.train.pixel --out A --steps 2500 --batch 12 --threads 1",)
WEIGHTS_SHA256 = "c333ed32dcc2f6f3bc9325fe2ec7f45b6680c4af39cc458750f53db8eb1d4e9f"


def build_unet():
    """The UNet of `tiny-pixel`, freshly initialised with the fixed seed (not trained)."""
    from diffusers import UNet2DModel

    with seeded_global_rng(SEED):
        return UNet2DModel(**UNET)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER)


def load_trained_unet(path: Path | None = None):
    """The trained UNet from the shipped weights (sha256 checked), in fp32."""
    from safetensors.torch import load_file

    path = path or WEIGHTS_DIR / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall mimicshield, or rebuild it with "
                                f"`{WEIGHTS_RECIPE[0].replace(' A ', ' DIR ')}`")
    if path == WEIGHTS_DIR / WEIGHTS_NAME and sha256(path) != WEIGHTS_SHA256:
        raise ValueError(f"{path} does not match its recorded sha256 {WEIGHTS_SHA256} (corrupt or replaced)")
    unet = build_unet()
    unet.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return unet.eval()


def _build():
    from diffusers import DDPMPipeline

    return DDPMPipeline(unet=load_trained_unet(), scheduler=build_scheduler())


def builtin_pixel_path() -> Path:
    """Directory of the built-in pixel DDPM (diffusers `DDPMPipeline` format), generated on first use."""
    return cached_pipeline_dir(models_cache_dir() / f"{NAME}-{VERSION}", _build, NAME)
