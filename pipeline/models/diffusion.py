"""The diffusion maths every method and mimic shares: noising, training targets, predicted originals,
timestep sampling, text conditioning and the denoiser call, for every model family.

Families (what the denoiser is; `denoiser_family`):

    unet   SD 1.x / 2.x / SDXL UNet      z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps,  target eps, v or z0
    sd3    SD3Transformer2DModel         z_t = (1 - s) z0 + s eps (rectified flow), target v = eps - z0
    flux   FluxTransformer2DModel        as sd3, on 2 x 2-packed latents, with a guidance embedding

For the flow families the timestep t is the scheduler's (s * T, s in (0, 1], T = num_train_timesteps),
so a flow scheduler and a DDPM one are used alike; `flow_sigma` gives s back.
"""

from __future__ import annotations

import torch

FLOW_MATCHING = "flow_matching"  # the "prediction type" of a flow-matching scheduler: velocity v = eps - z0
FLUX_GUIDANCE = 3.5  # FLUX.1-dev's distilled guidance: diffusers' train_dreambooth_lora_flux.py default
# how each family's own training draws t (diffusers' train_dreambooth_lora_{sd3,flux}.py defaults):
#   logit_normal   u = sigmoid(n), n ~ N(0, 1)  (SD3, Esser et al. 2024, sec. 3.1);   uniform   u ~ U(0, 1)
# then t = the scheduler's training timesteps[floor(u T)], which carry the config's shift
TIMESTEP_SAMPLING = {"unet": "uniform", "sd3": "logit_normal", "flux": "uniform"}
# T5 tokens of the prompt: the diffusers pipelines' max_sequence_length defaults (capped by the tokenizer)
T5_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}


def is_flow_scheduler(scheduler) -> bool:
    """A flow-matching scheduler (FlowMatchEulerDiscreteScheduler and its kin)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def prediction_kind(scheduler) -> str:
    """What the denoiser is trained to output: the config's prediction_type, or FLOW_MATCHING."""
    return FLOW_MATCHING if is_flow_scheduler(scheduler) else scheduler.config.prediction_type


def flow_sigma(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """s = t / T of a flow model's timestep, shaped to broadcast over `like`, in float32."""
    s = t.to(like.device).float() / scheduler.config.num_train_timesteps
    return s.view(-1, *([1] * (like.dim() - 1)))


def noise_latents(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t: sqrt(a_t) z0 + sqrt(1 - a_t) eps (DDPM family), or (1 - s) z0 + s eps (rectified flow)."""
    if is_flow_scheduler(scheduler):
        s = flow_sigma(scheduler, t, z0)
        return ((1 - s) * z0.float() + s * noise.float()).to(z0.dtype)
    return scheduler.add_noise(z0, noise.to(z0.dtype), t)


def training_timesteps(scheduler) -> torch.Tensor:
    """The timesteps a flow model is trained on (descending, s * T), as FlowMatchEulerDiscreteScheduler
    builds them before any `set_timesteps`: s_i = i / T, shifted s' = k s / (1 + (k - 1) s) unless the
    config shifts per resolution at inference (`use_dynamic_shifting`, FLUX)."""
    cfg = scheduler.config
    n = cfg.num_train_timesteps
    s = torch.linspace(1, n, n).flip(0) / n
    if not cfg.get("use_dynamic_shifting", False):
        s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
    return s * n


def sample_timesteps(scheduler, n: int, generator: torch.Generator, weighting: str = "uniform") -> torch.Tensor:
    """n training timesteps drawn as the model's own training draws them.

        DDPM family     t ~ U{0 .. T-1}
        flow families   u ~ `weighting` (TIMESTEP_SAMPLING), t = training_timesteps[floor(u T)]
    """
    if not is_flow_scheduler(scheduler):
        return torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
    if weighting == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator))
    elif weighting == "uniform":
        u = torch.rand(n, generator=generator)
    else:
        raise ValueError(f"unknown timestep weighting {weighting!r} (logit_normal, uniform)")
    timesteps = training_timesteps(scheduler)
    return timesteps[(u * len(timesteps)).long().clamp(max=len(timesteps) - 1)]

# --------------------------------------------------------------------------- latents


def latent_shift(vae) -> float:
    """The VAE's shift_factor (SD3 0.0609, FLUX.1 0.1159), 0 for SD 1.x/2.x/XL (none in their configs)."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def vae_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """z = s (E(x) - shift): the posterior mean of the encoder, x in [-1, 1] in the VAE's dtype (the pipelines'
    rule; shift = 0 for the SD families). The one implementation: protection, mimics and training use it."""
    return (vae.encode(x).latent_dist.mean - latent_shift(vae)) * vae.config.scaling_factor


# --------------------------------------------------------------------------- what the UNet predicts


def _alpha_bar(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """a_t = alphas_cumprod[t], shaped to broadcast over `like` (B x C x h x w), in float32."""
    a = scheduler.alphas_cumprod.to(like.device)[t.to(like.device)].float()
    return a.view(-1, *([1] * (like.dim() - 1)))


def prediction_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The denoiser's training target y_t at z_t (`noise_latents`), in z0's dtype.

        epsilon        y_t = eps
        v_prediction   y_t = v = sqrt(a_t) eps - sqrt(1 - a_t) z0      (Salimans & Ho 2022, sec. 4;
                                                                         diffusers get_velocity)
        sample         y_t = z0
        flow_matching  y_t = v = eps - z0 = d z_t / d s                 (rectified flow: Liu et al. 2022;
                                                                         SD3, Esser et al. 2024, eq. 2-3)

    Differentiable in z0 (for v, flow and sample the target moves with the image, and autograd sees it).
    """
    kind = prediction_kind(scheduler)
    if kind == FLOW_MATCHING:
        return (noise.float() - z0.float()).to(z0.dtype)
    if kind == "epsilon":
        return noise.to(z0.dtype)
    if kind == "v_prediction":
        a = _alpha_bar(scheduler, t, z0)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * z0.float()).to(z0.dtype)
    if kind == "sample":
        return z0
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon, v_prediction, sample)")


def predicted_original(scheduler, z_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z0_hat from the UNet's output at z_t (float32): the inverse of `prediction_target`.

        epsilon        z0_hat = (z_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)
        v_prediction   z0_hat = sqrt(a_t) z_t - sqrt(1 - a_t) v_hat
        sample         z0_hat = output
        flow_matching  z0_hat = z_t - s v_hat
    """
    kind = prediction_kind(scheduler)
    z_t, output = z_t.float(), output.float()
    if kind == FLOW_MATCHING:
        return z_t - flow_sigma(scheduler, t, z_t) * output
    a = _alpha_bar(scheduler, t, z_t)
    if kind == "epsilon":
        return (z_t - (1 - a).sqrt() * output) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * z_t - (1 - a).sqrt() * output
    if kind == "sample":
        return output
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon, v_prediction, sample)")


def sdxl_time_ids(height: int, width: int, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w) per sample, B x 6.

    We condition as SDXL does for an uncropped image shown at its own size.
    """
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    return ids.expand(batch, -1)


# --------------------------------------------------------------------------- text conditioning


def text_parts(model) -> list[tuple[object, object]]:
    """(tokenizer, text encoder) pairs of a pipeline or `DiffusionModels`: one for SD 1.x/2.x, two for SDXL
    and FLUX (CLIP, T5), three for SD3 (CLIP-L, CLIP-G, T5)."""
    parts = [(model.tokenizer, model.text_encoder)]
    for i in (2, 3):
        if getattr(model, f"text_encoder_{i}", None) is not None:
            parts.append((getattr(model, f"tokenizer_{i}"), getattr(model, f"text_encoder_{i}")))
    return parts


def is_t5(encoder) -> bool:
    return type(encoder).__name__.startswith("T5")


def t5_sequence_length(tokenizer, family: str) -> int:
    """T5 tokens per prompt: the diffusers pipeline's default for the family, capped by the tokenizer."""
    return min(int(tokenizer.model_max_length), T5_SEQUENCE_LENGTH[family])


def _tokens(tokenizer, prompts: list[str], length: int, device) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_text(parts: list[tuple[object, object]], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(c, pooled) for `prompts`, as the diffusers pipelines condition the denoiser (no guidance, no clip skip).

        SD 1.x / 2.x   c = last hidden state of the one text encoder; pooled = None
        SDXL           c = the two encoders' penultimate hidden states, concatenated on the feature axis;
                       pooled = the second encoder's projected text embedding
        SD3            c = [CLIP-L, CLIP-G penultimate states concatenated, zero-padded to T5's width; T5's
                       last state] concatenated on the token axis; pooled = both CLIP projections concatenated
        FLUX           c = T5's last hidden state; pooled = the CLIP encoder's pooled output

    The one implementation: protection (`DiffusionModels`), the mimics (SDEdit, textual inversion, LoRA) and
    the built-in models' training all call it. Gradients flow when the caller lets them (textual inversion).
    """
    if is_t5(parts[-1][1]):
        return _encode_text_flow(parts, prompts)
    hidden, pooled = [], None
    for tokenizer, encoder in parts:
        tokens = _tokens(tokenizer, prompts, tokenizer.model_max_length, encoder.device)
        if len(parts) == 1:
            hidden.append(encoder(tokens)[0])
            continue
        out = encoder(tokens, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: its text_embeds are the pooled c
            pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


def _encode_text_flow(parts, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 (CLIP, CLIP, T5) or FLUX (CLIP, T5) conditioning: see `encode_text`."""
    (t5_tokenizer, t5), clips = parts[-1], parts[:-1]
    family = "flux" if len(clips) == 1 else "sd3"
    t5_state = t5(_tokens(t5_tokenizer, prompts, t5_sequence_length(t5_tokenizer, family), t5.device))[0]
    if family == "flux":
        tokenizer, clip = clips[0]
        pooled = clip(_tokens(tokenizer, prompts, tokenizer.model_max_length, clip.device)).pooler_output
        return t5_state, pooled
    hidden, pooled = [], []
    for tokenizer, clip in clips:
        out = clip(_tokens(tokenizer, prompts, tokenizer.model_max_length, clip.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip_state = torch.cat(hidden, dim=-1)
    clip_state = torch.nn.functional.pad(clip_state, (0, t5_state.shape[-1] - clip_state.shape[-1]))
    return torch.cat([clip_state, t5_state.to(clip_state.device)], dim=-2), torch.cat(pooled, dim=-1)


# --------------------------------------------------------------------------- the denoiser call


def added_conditioning(pooled: torch.Tensor | None, family: str, height: int, width: int) -> dict | None:
    """The denoiser's conditioning beside c, from `encode_text`'s pooled embedding (`family`: denoiser_family's):

        SD 1.x / 2.x   None
        SDXL           {"text_embeds": pooled, "time_ids": sdxl_time_ids(height, width)}  (UNet's added_cond_kwargs)
        SD3, FLUX      {"pooled_projections": pooled}                                     (`denoise` passes it on)
    """
    if family != "unet":
        return {"pooled_projections": pooled}
    if pooled is None:
        return None
    return {"text_embeds": pooled, "time_ids": sdxl_time_ids(height, width, len(pooled), pooled.device, pooled.dtype)}


def text_conditioning(model, prompts: list[str], height: int, width: int) -> tuple[torch.Tensor, dict | None]:
    """(c, added) for `prompts` in the denoiser's dtype and on its device, as the diffusers pipelines condition
    their denoiser (no guidance): the one builder of the denoiser's text conditioning.

    `model`: a diffusers pipeline, or anything holding its parts (tokenizer(s), text encoder(s), and `unet` or
    `transformer`): the mimics' training parts, a built-in being trained. `DiffusionModels` caches per prompt
    and assembles the same two pieces (`encode_text`, `added_conditioning`).
    """
    net = model.transformer if getattr(model, "transformer", None) is not None else model.unet
    embeds, pooled = encode_text(text_parts(model), prompts)
    embeds = embeds.to(net.device, net.dtype)
    pooled = None if pooled is None else pooled.to(net.device, net.dtype)
    return embeds, added_conditioning(pooled, denoiser_family(net), height, width)


def denoiser_family(denoiser) -> str:
    """"unet", "sd3" or "flux": which call and noising rule a denoiser takes (module doc)."""
    return {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}.get(type(denoiser).__name__, "unet")


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """FLUX's packing: B x C x h x w -> B x (h/2 * w/2) x 4C (2 x 2 patches as tokens; FluxPipeline._pack_latents)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents`, for latents of height x width."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def flux_position_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """FLUX's image token ids (0, row, column) of packed h/2 x w/2 latents (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def denoise(denoiser, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, added: dict | None = None) -> torch.Tensor:
    """f_theta(z_t, t, c) of any family, B x C x h x w like z_t (the pipelines' own calls, without guidance):

        unet   unet(z_t, t, encoder_hidden_states=c, added_cond_kwargs=added)           added: SDXL's or None
        sd3    transformer(z_t, timestep=t, encoder_hidden_states=c, pooled_projections=added["pooled_projections"])
        flux   unpack(transformer(pack(z_t), timestep=t / 1000, guidance, pooled_projections, c, ids))
               guidance = added.get("guidance", FLUX_GUIDANCE) when the transformer embeds it (FLUX.1-dev)
    """
    family = denoiser_family(denoiser)
    b = z_t.shape[0]
    if family == "unet":
        return denoiser(z_t, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
    t = t.to(z_t.device).float().expand(b) if t.dim() else t.to(z_t.device).float().repeat(b)
    pooled = added["pooled_projections"]
    if family == "sd3":
        return denoiser(hidden_states=z_t, timestep=t.to(z_t.dtype), encoder_hidden_states=cond,
                        pooled_projections=pooled).sample
    h, w = z_t.shape[2:]
    guidance = None
    if denoiser.config.guidance_embeds:
        guidance = torch.full((b,), float(added.get("guidance", FLUX_GUIDANCE)), device=z_t.device, dtype=torch.float32)
    out = denoiser(hidden_states=pack_latents(z_t), timestep=(t / 1000).to(z_t.dtype), guidance=guidance,
                   pooled_projections=pooled, encoder_hidden_states=cond,
                   txt_ids=torch.zeros(cond.shape[1], 3, device=z_t.device, dtype=z_t.dtype),
                   img_ids=flux_position_ids(h, w, z_t.device, z_t.dtype)).sample
    return unpack_latents(out, h, w)


# --------------------------------------------------------------------------- the denoising loss


def denoising_loss(unet, scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                   added: dict | None = None, extra_input: torch.Tensor | None = None) -> torch.Tensor:
    """The standard training loss of a denoiser (UNet or flow transformer), mean over the batch (float32):

        L = || f_theta([z_t, extra], t, c) - y_t ||^2,   z_t = `noise_latents` (DDPM or rectified flow),
        y_t = `prediction_target` (eps, v or z0 as the scheduler says; v = eps - z0 for flow models,
        with the uniform loss weighting of diffusers' SD3/FLUX scripts for their default samplers)

    `extra_input`: channels appended to z_t (an inpainting UNet's mask and masked latent).
    The one implementation: the built-in models' training and the fine-tuning mimics (LoRA, textual
    inversion) call it, each with its own data and conditioning.
    """
    z_t = noise_latents(scheduler, z0, noise, t)
    model_in = z_t if extra_input is None else torch.cat([z_t, extra_input.to(z_t.dtype)], dim=1)
    pred = denoise(unet, model_in, t, cond, added)
    return torch.nn.functional.mse_loss(pred.float(), prediction_target(scheduler, z0, noise, t).float())
