"""The diffusion maths every method and mimic shares: noising, training targets, predicted originals."""

from __future__ import annotations

import torch

# --------------------------------------------------------------------------- what the UNet predicts


def _alpha_bar(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """a_t = alphas_cumprod[t], shaped to broadcast over `like` (B x C x h x w), in float32."""
    a = scheduler.alphas_cumprod.to(like.device)[t.to(like.device)].float()
    return a.view(-1, *([1] * (like.dim() - 1)))


def prediction_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The UNet's training target y_t at z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps, in z0's dtype.

        epsilon        y_t = eps
        v_prediction   y_t = v = sqrt(a_t) eps - sqrt(1 - a_t) z0      (Salimans & Ho 2022, sec. 4;
                                                                         diffusers get_velocity)
        sample         y_t = z0

    Differentiable in z0 (for v and sample the target moves with the image, and autograd sees it).
    """
    kind = scheduler.config.prediction_type
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
    """
    kind = scheduler.config.prediction_type
    a = _alpha_bar(scheduler, t, z_t)
    z_t, output = z_t.float(), output.float()
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
    """(tokenizer, text encoder) pairs of a pipeline or `DiffusionModels`: one for SD 1.x/2.x, two for SDXL."""
    parts = [(model.tokenizer, model.text_encoder)]
    if getattr(model, "text_encoder_2", None) is not None:
        parts.append((model.tokenizer_2, model.text_encoder_2))
    return parts


def encode_text(parts: list[tuple[object, object]], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(c, pooled) for `prompts`, as the diffusers pipelines condition the UNet (no guidance, no clip skip).

        SD 1.x / 2.x   c = last hidden state of the one text encoder; pooled = None
        SDXL           c = the two encoders' penultimate hidden states, concatenated on the feature axis;
                       pooled = the second encoder's projected text embedding

    The one implementation: protection (`DiffusionModels`), the mimics (SDEdit, textual inversion, LoRA) and
    the built-in models' training all call it. Gradients flow when the caller lets them (textual inversion).
    """
    hidden, pooled = [], None
    for tokenizer, encoder in parts:
        tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids.to(encoder.device)
        if len(parts) == 1:
            hidden.append(encoder(tokens)[0])
            continue
        out = encoder(tokens, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: its text_embeds are the pooled c
            pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


# --------------------------------------------------------------------------- the denoising loss


def denoising_loss(unet, scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                   added: dict | None = None, extra_input: torch.Tensor | None = None) -> torch.Tensor:
    """The standard training loss of a denoiser, mean over the batch (float32):

        L = || f_theta([z_t, extra], t, c) - y_t ||^2,   z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps,
        y_t = `prediction_target` (eps, v or z0, as the scheduler says)

    `extra_input`: channels appended to z_t (an inpainting UNet's mask and masked latent).
    The one implementation: the built-in models' training and the fine-tuning mimics (LoRA, textual
    inversion) call it, each with its own data and conditioning.
    """
    z_t = scheduler.add_noise(z0, noise, t)
    model_in = z_t if extra_input is None else torch.cat([z_t, extra_input.to(z_t.dtype)], dim=1)
    pred = unet(model_in, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
    return torch.nn.functional.mse_loss(pred.float(), prediction_target(scheduler, z0, noise, t).float())
