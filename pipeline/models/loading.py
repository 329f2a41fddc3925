"""Load the parts of a latent diffusion model: VAE, denoiser (UNet or transformer), text encoder(s), tokenizer(s), scheduler.

`ModelSpec(model, revision, device, dtype, low_memory)` says which model to load and how; it is
validated when built (once, from the CLI or a config file), travels as an object to every Ray actor
and task, and `spec.load()` (or `load_models(spec)`) loads it. `spec.check()` fails fast on the
driver when the model cannot be found, before any actor starts. `load_models(model_id, device=...)`
keeps working with plain arguments.

A model name accepted by both is
- a built-in name (``tiny``, ``tiny-v``, ``tiny-xl``, ``sd15-arch``, ...; see models/builtin/build.py),

`--model A,B,...` names an ensemble: `ModelSpec.members` gives one spec per model.

- a local directory in diffusers format (``model_index.json`` with ``vae/``, ``unet/``, ...),
- a Hugging Face hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5``.

All three go through diffusers/transformers ``from_pretrained``. Every weight is frozen and in
eval mode: protection only ever needs gradients with respect to the *input image*.

Model families (the pipeline class named in ``model_index.json``):
- SD 1.x / 2.x (``StableDiffusionPipeline``): one CLIP text encoder, c = its last hidden state.
- SDXL (``StableDiffusionXLPipeline``): two text encoders; c = both penultimate hidden states
  concatenated, plus the second encoder's pooled embedding and the size "time ids"
  (original size, crop top-left, target size), passed to the UNet as ``added_cond_kwargs``.
  SDXL's VAE overflows in fp16 (its config says ``force_upcast``): with ``dtype=fp16`` it is kept
  in fp32 (latents are cast to the UNet's dtype), or pass a directory whose ``vae/`` is an
  fp16-safe VAE such as ``madebyollin/sdxl-vae-fp16-fix`` (``force_upcast: false``).
- SD3 / SD3.5 (``StableDiffusion3Pipeline``) and FLUX.1 (``FluxPipeline``): rectified-flow models
  (flow-matching scheduler, velocity target v = eps - z0), a transformer denoiser (held in
  `DiffusionModels.unet`: "the denoiser"), a 16-channel VAE with ``shift_factor``; text from CLIP-L and
  CLIP-G with projections and T5 (SD3), or CLIP-L's pooled output and T5 (FLUX; latents packed 2 x 2, a
  guidance embedding). The T5 encoder is the large part: ``low_memory`` keeps every text encoder on the
  CPU (prompts are encoded once and cached); in fp16 their VAE stays fp32 when its config says
  ``force_upcast``; ``--dtype bf16`` is what their transformers are trained in.
Prediction types (`models.diffusion.prediction_kind`): ``epsilon``, ``v_prediction`` (SD 2.x
768, many fine-tunes), ``sample``, and flow matching; `prediction_target` is the one place that
says what the denoiser is trained to output.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from pipeline.models.builtin.build import BUILTIN_MODELS, builtin_model_path
from pipeline.models.diffusion import (
    TIMESTEP_SAMPLING,
    added_conditioning,
    denoiser_family,
    encode_text,
    latent_shift,
    prediction_kind,
    prediction_target,
    text_parts,
)
from pipeline.models.hub import alternatives, hub_problem
from pipeline.models.names import DEFAULT_MODEL, DTYPE_NAMES  # noqa: F401  (re-exported)

PROMPT_CACHE_SIZE = 256  # distinct prompt embeddings kept per process

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))

ENSEMBLE_SEPARATOR = ","  # --model A,B protects against several models at once


def pipeline_class_name(path: str, revision: str | None = None, is_local: bool = True) -> str:
    """`_class_name` of a diffusers model's model_index.json ("StableDiffusionPipeline" when absent)."""
    import json

    if is_local:
        index = Path(path) / "model_index.json"
        if not index.exists():
            return "StableDiffusionPipeline"
        return json.loads(index.read_text()).get("_class_name", "StableDiffusionPipeline")
    from huggingface_hub import hf_hub_download

    with open(hf_hub_download(path, "model_index.json", revision=revision)) as f:
        return json.load(f).get("_class_name", "StableDiffusionPipeline")


def is_sdxl_class(class_name: str) -> bool:
    return class_name.startswith("StableDiffusionXL")


def family_of_class(class_name: str) -> str:
    """"sd", "sdxl", "sd3" or "flux": the model family a pipeline class belongs to."""
    if is_sdxl_class(class_name):
        return "sdxl"
    if class_name.startswith("StableDiffusion3"):
        return "sd3"
    if class_name.startswith("Flux"):
        return "flux"
    return "sd"


def is_flow_class(class_name: str) -> bool:
    return family_of_class(class_name) in ("sd3", "flux")


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
    """The frozen parts of one latent diffusion model, on one device, in one dtype.

    For SDXL, `text_encoder_2`/`tokenizer_2` hold the second (OpenCLIP bigG) encoder; the VAE may
    be in float32 while the rest is fp16 (see the module doc): `encode` paths cast to `vae.dtype`.
    For SD3 and FLUX, `unet` holds the transformer (the denoiser) and the text encoders are numbered
    as in their pipelines (SD3: CLIP-L, CLIP-G, T5 in `text_encoder_3`; FLUX: CLIP-L, T5).
    """

    model_id: str
    path: str
    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: object | None = None
    pipeline_class: str = "StableDiffusionPipeline"
    revision: str | None = None
    _prompt_cache: dict = field(default_factory=dict, repr=False)

    @property
    def is_sdxl(self) -> bool:
        return is_sdxl_class(self.pipeline_class)

    @property
    def family(self) -> str:
        """"sd", "sdxl", "sd3" or "flux" (from model_index.json's pipeline class)."""
        return family_of_class(self.pipeline_class)

    @property
    def is_flow(self) -> bool:
        return self.family in ("sd3", "flux")

    @property
    def prediction_type(self) -> str:
        """epsilon, v_prediction, sample, or flow_matching (models.diffusion.prediction_kind)."""
        return prediction_kind(self.scheduler)

    @property
    def timestep_weighting(self) -> str:
        """How the denoiser's own training draws t (models.diffusion.TIMESTEP_SAMPLING)."""
        return TIMESTEP_SAMPLING[denoiser_family(self.unet)]

    @property
    def latent_scale(self) -> float:
        """s in z = s * (E(x) - shift); 0.18215 for SD 1.x/2.x, 0.13025 for SDXL (the VAE's own config)."""
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shift(self) -> float:
        """shift in z = s * (E(x) - shift): SD3's 0.0609, FLUX.1's 0.1159; 0 for the SD families."""
        return latent_shift(self.vae)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def training_side(self) -> int:
        """The side of the square the model was trained at: denoiser sample_size x VAE factor (512 for SD 1.5,
        1024 for SD3); FLUX's transformer has no sample_size: its VAE's (1024 for FLUX.1)."""
        if self.family == "flux":
            return int(self.vae.config.sample_size)
        return int(self.unet.config.sample_size) * self.vae_factor

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be a multiple of this: VAE downsampling x the denoiser's (UNet levels, SD3's patch,
        FLUX's 2 x 2 packing)."""
        if self.family == "sd3":
            return self.vae_factor * int(self.unet.config.patch_size)
        if self.family == "flux":
            return self.vae_factor * 2
        unet_down = 2 ** (len(self.unet.config.block_out_channels) - 1)
        return self.vae_factor * unet_down

    def prediction_target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What this model's UNet is trained to output at (z_t, t): see `prediction_target`."""
        return prediction_target(self.scheduler, z0, noise, t)

    def _text_parts(self) -> list[tuple[object, torch.nn.Module]]:
        return text_parts(self)

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states c, pooled embedding or None) for new prompts, as the diffusers pipelines do."""
        embeds, pooled = encode_text(self._text_parts(), prompts)
        embeds = embeds.to(self.device, self.dtype)
        return embeds, None if pooled is None else pooled.to(self.device, self.dtype)

    def _cached(self, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        for p in prompts:  # refresh recency of the prompts we already hold
            if p in self._prompt_cache:
                self._prompt_cache[p] = self._prompt_cache.pop(p)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            embeds, pooled = self._embed(missing)
            for i, prompt in enumerate(missing):
                self._prompt_cache[prompt] = (embeds[i], None if pooled is None else pooled[i])
        result = [self._prompt_cache[p] for p in prompts]
        while len(self._prompt_cache) > PROMPT_CACHE_SIZE:  # memory must not grow with the dataset
            self._prompt_cache.pop(next(iter(self._prompt_cache)))
        return result

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings c for each prompt; recent distinct prompts are kept (LRU, bounded)."""
        return torch.stack([hidden for hidden, _ in self._cached(prompts)])

    def added_conditioning(self, prompts: list[str], height: int, width: int) -> dict | None:
        """SDXL's `added_cond_kwargs` (pooled text embedding, time ids) at an image size; the pooled
        projections of SD3 and FLUX ({"pooled_projections": ...}, models.diffusion.denoise); None for SD."""
        pooled = None if self.family == "sd" else torch.stack([p for _, p in self._cached(prompts)])
        return added_conditioning(pooled, denoiser_family(self.unet), height, width)


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def resolve_model_path(model_id: str) -> tuple[str, bool]:
    """(path or hub id, is_local) of one model name: a built-in (built once), a local directory, or a hub id.

    The one model resolution: `load_models`, the mimics (`pretrained_source`) and `model_path` use it.
    """
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
        split_revisions(self.revision, len(split_model_ids(self.model)))  # an ensemble: one revision each
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

    @property
    def family(self) -> str:
        """"sd", "sdxl", "sd3" or "flux" of a single built-in or local model, read from its config or
        model_index.json without loading it; "sd" for a hub id (its own loading tells the truth)."""
        if self.is_builtin:
            from pipeline.models.builtin.build import CONFIGS

            return CONFIGS[self.model].get("family", "sd")
        local = Path(self.model).expanduser()
        return family_of_class(pipeline_class_name(str(local))) if local.is_dir() else "sd"

    @property
    def model_ids(self) -> list[str]:
        """The models of `A,B,...` (one id for a single model)."""
        return split_model_ids(self.model)

    @property
    def members(self) -> list["ModelSpec"]:
        """One spec per model of an ensemble (`[self]` for a single model)."""
        ids = self.model_ids
        if len(ids) == 1:
            return [self]
        return [replace(self, model=m, revision=r) for m, r in zip(ids, split_revisions(self.revision, len(ids)))]

    def load(self) -> "DiffusionModels":
        if len(self.model_ids) > 1:
            raise ValueError(f"--model {self.model}: this command takes one model, not an ensemble")
        return load_models(self.model, device=self.device, dtype=self.dtype, revision=self.revision,
                           low_memory=self.low_memory)

    def load_all(self) -> list["DiffusionModels"]:
        """Every model of the ensemble, loaded (a one-element list for a single model)."""
        return [m.load() for m in self.members]

    def check(self) -> None:
        """Raise `ModelLoadError` (on the driver, before any Ray work) when the model cannot be loaded."""
        if len(self.model_ids) > 1:
            for member in self.members:
                member.check()
            return
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

        problem = hub_problem(self.model, self.revision)  # one short request, no retries (pipeline/models/hub.py)
        if problem:
            raise ModelLoadError(f"cannot use model {self.model!r}: {problem}.\n{alternatives(BUILTIN_MODELS)}")


def model_path(model_id: str) -> str:
    """The diffusers directory (or hub id) of a model name accepted by `load_models`."""
    return resolve_model_path(model_id)[0]


def pretrained_source(model: "str | ModelSpec") -> tuple[str, dict]:
    """(path or hub id, `from_pretrained` keyword arguments) of a model name or spec: the spec's revision
    travels with a hub model (a pinned revision is honoured wherever the model is loaded)."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec(str(model))
    path, is_local = resolve_model_path(spec.model)
    return path, ({} if is_local or spec.revision is None else {"revision": spec.revision})


INPAINT_TWINS = {
    "tiny": "tiny-inpaint",
    "tiny-xl": "tiny-xl-inpaint",
    "stabilityai/stable-diffusion-xl-base-1.0": "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-inpainting",
}


def inpaint_model_for(model: str) -> str:
    """The inpainting twin of a known model (tiny -> tiny-inpaint, SD 1.5 -> SD 1.5 inpainting); else `model`."""
    return INPAINT_TWINS.get(model, model)


def split_model_ids(model: str) -> list[str]:
    """The models of `--model A,B,...` (one name for a single model); empty names are an error."""
    names = [m.strip() for m in str(model).split(ENSEMBLE_SEPARATOR)]
    if not all(names):
        raise ValueError(f"--model {model!r}: empty model name in the list (use A,B,...)")
    if len(set(names)) != len(names):
        raise ValueError(f"--model {model!r}: a model is listed twice")
    return names


def load_models(
    model_id: "str | ModelSpec" = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    low_memory: bool = False,
) -> DiffusionModels:
    """Load a Stable Diffusion (1.x, 2.x, XL, 3.x) or FLUX.1 model's parts, frozen, on `device` in `dtype`.

    `model_id` may be a `ModelSpec`, which then says everything (`load_models(spec)` is
    `spec.load()`; the other arguments must be left out).

    `low_memory` trades time for GPU memory, with identical results: the VAE encoder recomputes
    its activations in the backward pass (gradient checkpointing: about 1.6 GB less at 512x512
    in fp16 for SD) and the text encoder(s) stay on the CPU (prompts are encoded once and cached).
    """
    if isinstance(model_id, ModelSpec):
        if (device, dtype, revision, low_memory) != ("auto", "auto", None, False):
            raise TypeError("load_models(spec): the spec holds device, dtype, revision and low_memory")
        return model_id.load()
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path, is_local = resolve_model_path(model_id)
    kwargs = dict(torch_dtype=dtype)
    if not is_local:
        kwargs["revision"] = revision
    text_encoder_2 = tokenizer_2 = None
    try:
        class_name = pipeline_class_name(path, revision, is_local)
        if is_flow_class(class_name):
            parts = _load_flow_parts(path, class_name, kwargs, revision)
            return assemble_models(model_id, path, class_name, device=device, dtype=dtype, revision=revision,
                                   low_memory=low_memory, **parts)
        sdxl = is_sdxl_class(class_name)
        if sdxl and not (not is_local or (Path(path) / "text_encoder").is_dir()):
            raise ModelLoadError(f"{model_id}: an SDXL model without text_encoder/ (a refiner?) is not supported; "
                                 "pass an SDXL base model")
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kwargs)
        if sdxl:
            tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=revision)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kwargs)
    except ModelLoadError:
        raise
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
    return assemble_models(model_id, path, class_name, vae, unet, text_encoder, tokenizer, scheduler, device, dtype,
                           text_encoder_2, tokenizer_2, revision=revision, low_memory=low_memory)


def _load_flow_parts(path: str, class_name: str, kwargs: dict, revision: str | None) -> dict:
    """The parts of an SD3 or FLUX diffusers directory or hub id, by their pipelines' folder names."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )

    sd3 = family_of_class(class_name) == "sd3"
    parts = dict(
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs),
        unet=(SD3Transformer2DModel if sd3 else FluxTransformer2DModel).from_pretrained(
            path, subfolder="transformer", **kwargs),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
        text_encoder=(CLIPTextModelWithProjection if sd3 else CLIPTextModel).from_pretrained(
            path, subfolder="text_encoder", **kwargs),
    )
    t5_index = 3 if sd3 else 2
    if sd3:
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=revision)
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kwargs)
    parts[f"tokenizer_{t5_index}"] = T5TokenizerFast.from_pretrained(path, subfolder=f"tokenizer_{t5_index}",
                                                                      revision=revision)
    parts[f"text_encoder_{t5_index}"] = T5EncoderModel.from_pretrained(path, subfolder=f"text_encoder_{t5_index}",
                                                                       **kwargs)
    return parts


def assemble_models(model_id, path, class_name, vae, unet, text_encoder, tokenizer, scheduler, device, dtype,
                    text_encoder_2=None, tokenizer_2=None, revision=None, low_memory=False,
                    text_encoder_3=None, tokenizer_3=None) -> DiffusionModels:
    """Frozen `DiffusionModels` from loaded parts (also used on the meta device by the memory model)."""
    if (dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
            and (is_sdxl_class(class_name) or is_flow_class(class_name))):
        vae = vae.float()  # SDXL's VAE overflows in fp16 (NaN latents); an fp16-fix VAE says force_upcast false
    if low_memory:
        vae.enable_gradient_checkpointing()  # works in eval mode whenever grad is enabled
        text_encoder = text_encoder.float()
        text_encoder_2 = text_encoder_2.float() if text_encoder_2 is not None else None
        text_encoder_3 = text_encoder_3.float() if text_encoder_3 is not None else None
    text_device = "cpu" if low_memory and device.type != "meta" else device
    return DiffusionModels(
        model_id=model_id,
        path=path,
        vae=_freeze(vae).to(device),
        unet=_freeze(unet).to(device),
        text_encoder=_freeze(text_encoder).to(text_device),
        tokenizer=tokenizer,
        scheduler=scheduler,
        device=device,
        dtype=dtype,
        text_encoder_2=None if text_encoder_2 is None else _freeze(text_encoder_2).to(text_device),
        tokenizer_2=tokenizer_2,
        text_encoder_3=None if text_encoder_3 is None else _freeze(text_encoder_3).to(text_device),
        tokenizer_3=tokenizer_3,
        pipeline_class=class_name,
        revision=revision,
    )


def split_revisions(revision: str | None, n_models: int) -> list[str | None]:
    """One revision per model: None, one revision for a single model, or `r1,r2,...` (empty = default)."""
    if revision is None:
        return [None] * n_models
    revs = [r.strip() or None for r in str(revision).split(ENSEMBLE_SEPARATOR)]
    if len(revs) != n_models:
        raise ValueError(f"--revision {revision!r}: give one revision per model of the ensemble "
                         f"({n_models}, comma-separated, empty for the default)")
    return revs


def load_ensemble(
    model: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    low_memory: bool = False,
) -> list[DiffusionModels]:
    """`load_models` for each model of `A,B,...` (a one-element list for a single model)."""
    names = split_model_ids(model)
    return [load_models(name, device=device, dtype=dtype, revision=rev, low_memory=low_memory)
            for name, rev in zip(names, split_revisions(revision, len(names)))]
