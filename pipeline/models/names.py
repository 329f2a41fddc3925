"""Model names the command line offers, importable without torch (`pipeline.models.loading` maps them to dtypes)."""

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # loading.DTYPES: torch.float32, float16, bfloat16
