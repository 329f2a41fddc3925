"""Load the parts of a Stable Diffusion model: VAE, UNet, text encoder, tokenizer, scheduler.

`ModelSpec(model, revision, device, dtype, low_memory)` says which model to load and how; it is
validated when built (once, from the CLI or a config file), travels as an object to every Ray actor
and task, and `spec.load()` (or `load_models(spec)`) loads it. `spec.check()` fails fast on the
driver when the model cannot be found, before any actor starts. `load_models(model_id, device=...)`
keeps working with plain arguments.

A model name accepted by both is
- a built-in name (``tiny``, ``tiny-inpaint``, ``sd15-arch``, ``sd21-arch``; see builtin_models),
- a local directory in diffusers format (``model_index.json`` with ``vae/``, ``unet/``, ...),
- a Hugging Face hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5``.

All three go through diffusers/transformers ``from_pretrained``. Every weight is frozen and in
eval mode: protection only ever needs gradients with respect to the *input image*.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .builtin_models import BUILTIN_MODELS, builtin_model_path

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

PROMPT_CACHE_SIZE = 256  # distinct prompt embeddings kept per process

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do instead."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}") from None


@dataclass
class DiffusionModels:
    """The frozen parts of one latent diffusion model, on one device, in one dtype."""

    model_id: str
    path: str
    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    _prompt_cache: dict = field(default_factory=dict, repr=False)

    @property
    def latent_scale(self) -> float:
        """s in z = s * E(x); 0.18215 for SD 1.x/2.x."""
        return float(self.vae.config.scaling_factor)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be a multiple of this: VAE downsampling x UNet downsampling."""
        unet_down = 2 ** (len(self.unet.config.block_out_channels) - 1)
        return self.vae_factor * unet_down

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings c for each prompt; recent distinct prompts are kept (LRU, bounded)."""
        for p in prompts:  # refresh recency of the prompts we already hold
            if p in self._prompt_cache:
                self._prompt_cache[p] = self._prompt_cache.pop(p)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            tokens = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.text_encoder.device)
            embeds = self.text_encoder(tokens)[0].to(self.device, self.dtype)
            for prompt, embed in zip(missing, embeds):
                self._prompt_cache[prompt] = embed
        result = torch.stack([self._prompt_cache[p] for p in prompts])
        while len(self._prompt_cache) > PROMPT_CACHE_SIZE:  # memory must not grow with the dataset
            self._prompt_cache.pop(next(iter(self._prompt_cache)))
        return result


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def _resolve_path(model_id: str) -> tuple[str, bool]:
    """(path or hub id, is_local)."""
    if model_id in BUILTIN_MODELS:
        return str(builtin_model_path(model_id)), True
    local = Path(model_id).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").exists() and not (local / "unet").is_dir():
            raise ModelLoadError(
                f"{model_id} is a directory but not a diffusers model (no model_index.json, no unet/)."
            )
        return str(local), True
    return model_id, False


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how: the one description every command and stage passes around.

    Validated once, when built; `load()` gives the frozen `DiffusionModels`, `check()` the
    driver-side preflight (builds a built-in model once, checks a local directory, or asks the hub
    for ``model_index.json``).
    """

    model: str = DEFAULT_MODEL  # hub id, local diffusers directory, or a built-in name
    revision: str | None = None  # hub revision (commit, tag); ignored for local and built-in models
    device: str = "auto"  # auto (cuda when present, else cpu), cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto (fp16 on cuda, fp32 elsewhere), fp32, fp16, bf16
    low_memory: bool = False  # VAE-encoder checkpointing, text encoder on CPU: same result, less GPU memory

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a hub id, a local directory or a built-in name, got {self.model!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from auto, {', '.join(DTYPES)}")
        if not DEVICE_PATTERN.fullmatch(str(self.device)):
            raise ValueError(f"unknown device {self.device!r}; use auto, cpu, cuda, cuda:N or mps")

    def on(self, device: str) -> "ModelSpec":
        """The same model on another device (e.g. the device a Ray actor was given)."""
        return replace(self, device=device)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_builtin(self) -> bool:
        return self.model in BUILTIN_MODELS

    def load(self) -> "DiffusionModels":
        return load_models(self.model, device=self.device, dtype=self.dtype, revision=self.revision,
                           low_memory=self.low_memory)

    def check(self) -> None:
        """Raise `ModelLoadError` (on the driver, before any Ray work) when the model cannot be loaded."""
        if self.is_builtin:
            builtin_model_path(self.model)  # generate it once here rather than in every actor
            return
        local = os.path.expanduser(self.model)
        if os.path.isdir(local):
            if not os.path.exists(os.path.join(local, "model_index.json")) and not os.path.isdir(os.path.join(local, "unet")):
                raise ModelLoadError(f"{self.model} is a directory but not a diffusers model (no model_index.json, no unet/)")
            return
        if self.model.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", self.model):
            raise ModelLoadError(
                f"unknown model {self.model!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), not a local diffusers "
                "directory, not a hub id (owner/name)"
            )
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(self.model, "model_index.json", revision=self.revision)
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ModelLoadError(
                f"cannot reach model {self.model!r} on the Hugging Face hub ({type(err).__name__}: {first}). Pass a "
                f"local diffusers directory or a built-in ({', '.join(BUILTIN_MODELS)})"
            ) from None


def load_models(
    model_id: "str | ModelSpec" = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    low_memory: bool = False,
) -> DiffusionModels:
    """Load a Stable Diffusion model's parts, frozen, on `device` in `dtype`.

    `model_id` may be a `ModelSpec`, which then says everything (`load_models(spec)` is
    `spec.load()`; the other arguments must be left out).

    `low_memory` trades time for GPU memory, with identical results: the VAE encoder recomputes
    its activations in the backward pass (gradient checkpointing: about 1.6 GB less at 512x512
    in fp16 for SD) and the text encoder stays on the CPU (prompts are encoded once and cached).
    """
    if isinstance(model_id, ModelSpec):
        if (device, dtype, revision, low_memory) != ("auto", "auto", None, False):
            raise TypeError("load_models(spec): the spec holds device, dtype, revision and low_memory")
        return model_id.load()
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path, is_local = _resolve_path(model_id)
    kwargs = dict(torch_dtype=dtype)
    if not is_local:
        kwargs["revision"] = revision
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kwargs)
    except Exception as err:  # hub/network/format errors all end here with one clear message
        if is_local:
            raise ModelLoadError(f"could not load the diffusers model at {path}: {err}") from err
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise ModelLoadError(
            f"could not load {model_id!r} from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}\n"
            "Alternatives: pass a local diffusers directory (--model /path/to/stable-diffusion-v1-5), "
            "download it first with `huggingface-cli download <id>` on a machine with network, "
            f"or use a built-in model ({', '.join(BUILTIN_MODELS)}) to try the machinery."
        ) from err
    if low_memory:
        vae.enable_gradient_checkpointing()  # works in eval mode whenever grad is enabled
        text_encoder = text_encoder.float()
    return DiffusionModels(
        model_id=model_id,
        path=path,
        vae=_freeze(vae).to(device),
        unet=_freeze(unet).to(device),
        text_encoder=_freeze(text_encoder).to("cpu" if low_memory else device),
        tokenizer=tokenizer,
        scheduler=scheduler,
        device=device,
        dtype=dtype,
    )
