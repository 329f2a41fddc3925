"""What protecting an image costs, known before paying it (issue 27).

- `step_cost(protector, size)`: the FLOPs and the activation memory autograd keeps for one PGD step of
  the protector's method at a working size, counted on a *meta* copy of its models (same configs, no
  weights, nothing computed: milliseconds even for SDXL at 4096^2). The step is the method's own
  `direction` (so the count follows the method: photoguard has no UNet, sds- no UNet backward), plus,
  for `auto`, the resize of the full-size image.
- `Estimate`: seconds per image = steps x (one *measured* step at a reference size) x FLOPs(working) /
  FLOPs(reference), plus, for a method that pays a fixed cost per round of steps (aspl trains its surrogate
  each round: `Protector.rounds`), one more measured round per round after the first, scaled alike. The reference is the working size itself when it is no larger than the model's
  training area (at least 256^2), so `auto` is measured, not modelled; larger working sizes (native on a poster) are
  extrapolated by FLOPs, which on this 2-core CPU is within a factor of two (benchmarks/README.md).
- `MemoryGate`: an image whose step needs more memory than the limit (``--max-memory``, else what the
  device has free) becomes an error row naming --resolution, before any allocation, instead of an actor
  killed by the OOM killer. What a method holds for the whole run besides (aspl's surrogate and its
  optimiser: `Protector.resident_bytes`) is added to every step.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.protect.methods import StepInputs

REFERENCE_MIN_SIDE = 256  # a step smaller than this is mostly overhead: a poor yardstick (tiny trains at 64)
SAFETY = 1.0  # saved activations x this + the full-size tensors = the step's peak (refuse only what surely cannot fit)


def meta_copy(models):
    """The same model on the meta device: configs and shapes only (see the module doc)."""
    import logging

    def empty(module):
        if module is None:
            return None
        config = module.config
        with torch.device("meta"):
            made = type(module).from_config(config) if hasattr(type(module), "from_config") else type(module)(config)
        quiet = logging.getLogger("diffusers")
        level, quiet.level = quiet.level, logging.ERROR  # "modules that should be kept in float32: []"
        try:
            return made.to(dtype=next(module.parameters()).dtype).requires_grad_(False).eval()
        finally:
            quiet.setLevel(level)

    return dataclasses.replace(models, vae=empty(models.vae), unet=empty(models.unet),
                               text_encoder=empty(models.text_encoder), text_encoder_2=empty(models.text_encoder_2),
                               text_encoder_3=empty(models.text_encoder_3),
                               scheduler=copy.deepcopy(models.scheduler),  # diffusers moves its tables to the input's device
                               device=torch.device("meta"), _prompt_cache={})


@dataclass(frozen=True)
class StepCost:
    flops: float  # one PGD step, every member of an ensemble
    saved_bytes: int  # activations autograd keeps for the backward (the largest member)
    image_bytes: int  # full-size tensors PGD keeps (x, x_adv, direction, for `auto` the resize graph)

    @property
    def peak_bytes(self) -> float:
        return self.saved_bytes * SAFETY + self.image_bytes


def step_cost(protector, height: int, width: int) -> StepCost:
    """FLOPs and memory of one PGD step on a height x width image (see the module doc)."""
    working = protector.working_size(height, width)
    through = working[0] * working[1] < height * width and protector.config.resolution == "auto"
    flops, saved = 0.0, 0
    for models in protector.members:
        meta = getattr(models, "_meta_copy", None)
        if meta is None:
            meta = models._meta_copy = meta_copy(models)  # built once per loaded model
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        latent = (1, meta.latent_channels, working[0] // meta.vae_factor, working[1] // meta.vae_factor)
        dtype = meta.dtype
        cond, added = meta_conditioning(meta)
        inputs = StepInputs(
            cond=cond,
            t=torch.tensor([500.0 if meta.is_flow else 500], device="meta"),
            noise=torch.zeros(latent, device="meta", dtype=dtype),
            target_latent=torch.zeros(latent, device="meta", dtype=dtype),
            added_cond=added,
        )
        leaf = torch.zeros(1, 3, height if through else working[0], width if through else working[1],
                           device="meta", requires_grad=True)
        counter = FlopCounterMode(display=False)
        with counter, fused_attention_on_meta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = leaf * 1.0  # not a leaf: the flop counter's hooks refuse autograd.grad on leaves
            seen = torch.nn.functional.interpolate(x, size=working, mode="bilinear", antialias=True) if through else x
            d = protector.method.direction(meta, seen, inputs)
            if through:
                torch.autograd.grad(seen, x, grad_outputs=d)
        flops += counter.get_total_flops()
        saved = max(saved, sum(storages.values()))
    return StepCost(flops=float(flops), saved_bytes=saved, image_bytes=full_size_bytes(height, width, through))


class fused_attention_on_meta:
    """Count attention on the meta device as a fused kernel saves it (q, k, v, output, log-sum-exp), not as the
    math path does (the whole softmax matrix, heads x tokens^2).

    On the meta device `scaled_dot_product_attention` has no fused kernel and falls back to the math path, while
    a real step uses one (flash / memory-efficient on CUDA, flash on CPU): counted the math way, FLUX's 4608 tokens
    at 1024^2 cost 1 GB per layer that no real step keeps. Inside this context an unmasked, dropout-free call on
    meta tensors goes to `aten._scaled_dot_product_flash_attention_for_cpu`, whose meta kernel saves what the fused
    kernels save; every other call is left alone.
    """

    def __enter__(self):
        import torch.nn.functional as F

        self.original = original = F.scaled_dot_product_attention

        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            if query.device.type != "meta" or attn_mask is not None or dropout_p or enable_gqa:
                return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, enable_gqa=enable_gqa)
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, 0.0, is_causal, scale=scale)[0]

        F.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        F.scaled_dot_product_attention = self.original


def meta_conditioning(meta) -> tuple[torch.Tensor, dict | None]:
    """(c, added conditioning) of one prompt, as zeros of the right shapes on the meta device, for any family:
    SD 77 CLIP tokens; SDXL + pooled and time ids; SD3 77 CLIP + T5 tokens and pooled projections; FLUX T5 tokens."""
    from pipeline.models.diffusion import t5_sequence_length

    config, dtype = meta.unet.config, meta.dtype

    def zeros(*shape):
        return torch.zeros(*shape, device="meta", dtype=dtype)

    if meta.is_flow:
        t5_tokenizer = meta.tokenizer_3 if meta.family == "sd3" else meta.tokenizer_2
        tokens = t5_sequence_length(t5_tokenizer, meta.family) + (77 if meta.family == "sd3" else 0)
        return zeros(1, tokens, config.joint_attention_dim), {"pooled_projections": zeros(1, config.pooled_projection_dim)}
    cond = zeros(1, 77, config.cross_attention_dim)
    if not meta.is_sdxl:
        return cond, None
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return cond, {"text_embeds": zeros(1, pooled), "time_ids": zeros(1, 6)}


def full_size_bytes(height: int, width: int, through: bool) -> int:
    """The full-size float32 tensors PGD keeps: x, x_adv, direction, sign (and, through the resize, its graph)."""
    return (8 if through else 4) * 3 * height * width * 4


def memory_limit_bytes(device: torch.device, configured_gb: float | None) -> float:
    """The memory one protection may use: --max-memory if set, else what the device has free now."""
    if configured_gb is not None:
        return configured_gb * 2**30
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # PyTorch's, reusable
        return float(free + cached)
    import psutil

    return float(psutil.virtual_memory().available)


class MemoryGate:
    """Refuses, per image, a working size whose step would not fit the memory limit (see the module doc).

    The count on the meta device takes a fraction of a second, so it is kept per working size (auto
    buckets an archive's sizes into a few); the full-size tensors are counted from the image's size.
    """

    def __init__(self, protector, limit_gb: float | None = None):
        self.protector, self.limit_gb = protector, limit_gb
        self._saved: dict[tuple, int] = {}

    def peak_bytes(self, height: int, width: int) -> float:
        working = self.protector.working_size(height, width)
        through = working[0] * working[1] < height * width and self.protector.config.resolution == "auto"
        key = (working, through)
        if key not in self._saved:
            self._saved[key] = step_cost(self.protector, height, width).saved_bytes
        return self._saved[key] * SAFETY + full_size_bytes(height, width, through) + self.protector.resident_bytes()

    def refusal(self, height: int, width: int) -> str | None:
        """None when the image's step fits, else the error row's reason."""
        limit = memory_limit_bytes(self.protector.models.device, self.limit_gb)
        need = self.peak_bytes(height, width)
        if need <= limit:
            return None
        h, w = self.protector.working_size(height, width)
        source = "--max-memory" if self.limit_gb is not None else "free"
        return (f"working size {h}x{w} (--resolution {self.protector.config.resolution}) needs about "
                f"{need / 2**30:.1f} GiB for {self.protector.config.method}, more than the {limit / 2**30:.1f} GiB "
                f"{source}; use --resolution auto or a smaller N")


@dataclass(frozen=True)
class Estimate:
    seconds_per_image: float
    size: tuple[int, int]  # the image (h, w)
    working: tuple[int, int]
    seconds_per_step: float
    seconds_per_round: float = 0.0  # aspl: one surrogate training (each round after the first, besides its steps)


def estimate(protector, height: int, width: int) -> Estimate:
    """Seconds to protect one height x width image (see the module doc).

    At the reference size a 1-step and a 2-step protection are timed: their difference is one step, the
    rest is the per-image overhead (conversions, start, prompt); the step is scaled by FLOPs.
    """
    working = protector.working_size(height, width)
    side = min(max(working), max(REFERENCE_MIN_SIDE, *(m.training_side for m in protector.members)))
    ref = (height, width) if working[0] * working[1] <= side * side else reference_size(working, side, protector.pixel_multiple)
    image = np.random.default_rng(0).integers(0, 256, (*ref, 3), dtype=np.uint8)

    def seconds(steps: int) -> float:
        probe = type(protector)(protector.members, dataclasses.replace(protector.config, steps=steps))
        start = time.perf_counter()
        probe.protect([image], keys=["estimate"])
        return time.perf_counter() - start

    seconds(1)  # warm-up: prompt cache, allocator, target latent
    one, two = seconds(1), seconds(2)
    per_step_ref = max(two - one, 1e-6)
    overhead = max(one - per_step_ref, 0.0)
    scale = step_cost(protector, height, width).flops / max(step_cost(protector, *ref).flops, 1.0)
    per_step = per_step_ref * scale
    steps = protector.config.steps
    per_round = 0.0
    if protector.rounds(steps) > 1:  # aspl: the overhead holds one round's surrogate training; time one more
        in_round = next(n for n in range(1, steps) if protector.rounds(n + 1) > protector.rounds(n))
        per_round = max(seconds(in_round + 1) - seconds(in_round) - per_step_ref, 0.0) * scale
    return Estimate(seconds_per_image=overhead + per_step * steps + per_round * (protector.rounds(steps) - 1),
                    size=(height, width), working=working, seconds_per_step=per_step, seconds_per_round=per_round)


def reference_size(working: tuple[int, int], side: int, multiple: int) -> tuple[int, int]:
    """A size of about side^2 pixels with the working size's aspect (where a step is measured)."""
    scale = (side * side / (working[0] * working[1])) ** 0.5
    return tuple(max(multiple, round(n * scale / multiple) * multiple) for n in working)  # type: ignore[return-value]
