"""Count the memory of one protection step without a GPU (used by benchmarks/bench_memory_model.py).

A PGD step's peak GPU memory is about weights on the device + the activations autograd saves for the
backward + the largest transient. `saved_bytes_of_step` counts the saved activations exactly, by
running the step's forward with `torch.autograd.graph.saved_tensors_hooks` (each saved storage counted
once); `meta_models` builds a built-in architecture on PyTorch's meta device, where the same count
costs nothing (shapes and dtypes are real, nothing is computed or allocated; attention is counted as the
fused kernels a real step uses keep it: `cost.fused_attention_on_meta`).
"""

from __future__ import annotations

import torch

from pipeline.models.builtin.build import build_pipeline
from pipeline.models.loading import assemble_models, resolve_dtype
from pipeline.protect.cost import fused_attention_on_meta, meta_conditioning
from pipeline.protect.methods import StepInputs, encode, predict


def meta_models(name: str, dtype: str, low_memory: bool):
    """A built-in architecture on the meta device (no weights allocated, nothing computed)."""
    device = torch.device("meta")
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        pipe = build_pipeline(name).to(dtype=dtype)
    denoiser = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
    return assemble_models(name, "meta", type(pipe).__name__, pipe.vae, denoiser, pipe.text_encoder, pipe.tokenizer,
                           pipe.scheduler, device, dtype, getattr(pipe, "text_encoder_2", None),
                           getattr(pipe, "tokenizer_2", None), low_memory=low_memory,
                           text_encoder_3=getattr(pipe, "text_encoder_3", None),
                           tokenizer_3=getattr(pipe, "tokenizer_3", None))


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def saved_bytes_of_step(protector, x01: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one step of the protector's method."""
    models = protector.models
    storages: dict[int, int] = {}  # keyed by the storage itself (works on the meta device, where data_ptr is 0)
    weights = {p.untyped_storage()._cdata for m in (models.vae, models.unet) for p in m.parameters()}
    saved_refs = []  # keep saved tensors alive so no storage address is reused while counting

    def pack(t: torch.Tensor):
        key = t.untyped_storage()._cdata
        if key not in weights:  # weights are counted once, as weights
            storages[key] = t.untyped_storage().nbytes()
            saved_refs.append(t)
        return t

    size = tuple(x01.shape[2:])
    latent = (1, models.latent_channels, size[0] // models.vae_factor, size[1] // models.vae_factor)
    if models.device.type == "meta":  # the text encoders hold no weights: zeros of the conditioning's shapes
        cond, added = meta_conditioning(models)
    else:
        cond, added = models.encode_prompts(["a photo"]), models.added_conditioning(["a photo"], *size)
    inputs = StepInputs(
        cond=cond,
        t=torch.tensor([500.0 if models.is_flow else 500], device=models.device),
        noise=torch.randn(latent).to(models.device, models.dtype),
        target_latent=protector.target_latent(size),
        added_cond=added,
    )
    x = x01.to(models.device).clone().requires_grad_(True)
    method = protector.method
    with fused_attention_on_meta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if method.name.startswith("sds"):  # SDS: the encoder's graph only; the UNet runs under no_grad
            z = encode(models, x)
            with torch.no_grad():
                predict(models, z.detach(), inputs)
        else:
            method.objective(models, x, inputs)
    return sum(storages.values())


def text_bytes(models) -> int:
    return sum(module_bytes(m) for m in (models.text_encoder, models.text_encoder_2, models.text_encoder_3)
               if m is not None)
