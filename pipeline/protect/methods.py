"""The Diff-Protect family of protection objectives (Xue et al., ICLR 2024, arXiv 2311.12832).

Notation (as in the paper): x is the image in [-1, 1] inside the model, z = s * E(x) its latent
(s = vae.config.scaling_factor), t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(a_t) z + sqrt(1 - a_t) eps,
c the prompt's text embedding, y a fixed target image for the textural loss.

    L_sem(x) = E_{t,eps} || f_theta(z_t, t, c) - y_t ||^2            (semantic loss, mean)
    L_tex(x) = || E(x) - E(y) ||^2                                   (textural loss, sum)

f_theta is the UNet and y_t its training target (models.prediction_target): y_t = eps for an
epsilon model (the paper's eps_theta - eps), y_t = v = sqrt(a_t) eps - sqrt(1 - a_t) z for a
v-prediction model (SD 2.x 768, many fine-tunes). The v target depends on z, so full-gradient
methods differentiate it too. For SDXL, c also carries the pooled embedding and size time ids.

Every method gives a *direction* g for the PGD step x <- x + alpha * sign(direction * g):

    method       direction   g                                      gradient through
    advdm        ascend      dL_sem/dx                              UNet and encoder
    advdm-       descend     dL_sem/dx                              UNet and encoder
    photoguard   descend     dL_tex/dx                              encoder
    mist         descend     d(L_tex - w L_sem)/dx,   w = 1e4       UNet and encoder
    sds+         ascend      (dz/dx)^T (f_theta - y_t)              encoder only (SDS)
    sds-         descend     (dz/dx)^T (f_theta - y_t)              encoder only (SDS)
    sdst-        descend     r * g_sds + dL_tex/dx,   r = 5         encoder only

The SDS family runs the UNet under `torch.no_grad()`: its Jacobian is skipped (paper eq. 5,
"score distillation"), which is where the time and memory saving comes from. No method ever
asks for gradients of model weights: they are frozen and only the image requires grad.

SDS residual for v-prediction: with eps_hat = sqrt(a_t) v_hat + sqrt(1 - a_t) z_t (the eps a
v-model implies), eps_hat - eps = sqrt(a_t) (v_hat - v). So the residual in v and the residual
converted to eps differ by a positive factor per sample, which the sign step (and an ensemble's
per-model normalisation) ignores: (v_hat - v) is the SDS residual of a v-model.

Flow-matching models (SD3, FLUX; issue 21). A rectified-flow model noises along a straight line and
is trained on its velocity (models.diffusion: noise_latents, prediction_target):

    z_t = (1 - s) z + s eps,   s = t / T,      v = d z_t / d s = eps - z,
    L_sem(x) = E_{t,eps} || v_theta(z_t, t, c) - (eps - z) ||^2,   t drawn as the model's training draws it

(logit-normal u for SD3, uniform for FLUX, mapped through the scheduler's shifted timesteps:
models.diffusion.sample_timesteps). Every method above keeps its definition with y_t = v.

The SDS analogue. Write r = v_theta(z_t, t, c) - (eps - z). By the chain rule, with J = d v_theta / d z_t,

    d L_sem / d z = 2 r^T ( (1 - s) J  +  I )

The first term is the network's Jacobian through z_t (dz_t/dz = (1 - s) I); the second comes from the
target, which moves with z (d(eps - z)/dz = -I, and the minus sign of the residual makes it +I). Skipping
the Jacobian of the transformer, as SDS skips the UNet's (paper eq. 5), leaves

    g_sds = 2 (dz/dx)^T r = 2 (dz/dx)^T (v_theta - v)

so the flow model's SDS residual is again (output - target), as for eps and v models: `sds_residual`
needs no flow-specific code. Unlike the eps case, the term kept here is not "the network's view of the
noise" but the exact gradient of the target term. The term dropped, 2 (1 - s) r^T J, shrinks as s -> 1;
elsewhere nothing in the algebra bounds it (at a perfect model on very broad data, (1 - s) J -> -I and the
two terms cancel), so its effect is measured, not assumed: tests/test_flow.py checks that g_sds has a
positive cosine with the full gradient on tiny-sd3 and tiny-flux at several t (measured: 0.83-0.99 on
tiny-sd3, 0.59-0.99 on tiny-flux for t = 100 .. 900, lowest at small t, where (1 - s) J weighs most).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.models.diffusion import denoise, noise_latents, vae_latents
from pipeline.models.loading import DiffusionModels


@dataclass
class StepInputs:
    """What one PGD step needs besides the image: fixed per step so gradients are testable."""

    cond: torch.Tensor  # B x 77 x D text embeddings c
    t: torch.Tensor  # B timesteps
    noise: torch.Tensor  # B x 4 x h x w, eps
    target_latent: torch.Tensor | None = None  # B x 4 x h x w, s * E(y)
    added_cond: dict | None = None  # SDXL: {"text_embeds": B x D pooled, "time_ids": B x 6}; None for SD


# --------------------------------------------------------------------------- building blocks


def encode(models: DiffusionModels, x01: torch.Tensor) -> torch.Tensor:
    """z = s * (E(x) - shift): the posterior mean of the VAE encoder (deterministic), x01 in [0, 1]
    (shift: a flow model's VAE shift_factor, 0 for SD).

    The VAE runs in its own dtype (fp32 for SDXL under fp16); z comes back in the UNet's dtype.
    """
    x = (x01 * 2 - 1).to(models.vae.dtype)
    return vae_latents(models.vae, x).to(models.dtype)


def predict(models: DiffusionModels, z: torch.Tensor, inputs: StepInputs, net=None) -> torch.Tensor:
    """f_theta(z_t, t, c) with z_t = sqrt(a_t) z + sqrt(1 - a_t) eps (eps_theta, or v_theta).

    `net`: another denoiser of the same family in place of the model's own (ASPL's surrogate, aspl.py)."""
    z_t = noise_latents(models.scheduler, z, inputs.noise.to(z.dtype), inputs.t)
    return denoise(models.unet if net is None else net, z_t, inputs.t, inputs.cond, inputs.added_cond)


predict_noise = predict  # the name for epsilon models


def semantic_loss(models: DiffusionModels, z: torch.Tensor, inputs: StepInputs, net=None) -> torch.Tensor:
    """L_sem per sample: mean over elements of (f_theta(z_t, t, c) - y_t)^2, y_t = eps or v (`net`: as `predict`)."""
    err = predict(models, z, inputs, net).float() - models.prediction_target(z, inputs.noise, inputs.t).float()
    return err.pow(2).flatten(1).mean(1)


@torch.no_grad()
def sds_residual(models: DiffusionModels, z: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
    """f_theta(z_t, t, c) - y_t at a detached z, outside autograd (the UNet's Jacobian is skipped)."""
    z = z.detach()
    return predict(models, z, inputs) - models.prediction_target(z, inputs.noise, inputs.t)


def textural_loss(z: torch.Tensor, target_latent: torch.Tensor) -> torch.Tensor:
    """L_tex per sample: sum over elements of (E(x) - E(y))^2."""
    return (z.float() - target_latent.float()).pow(2).flatten(1).sum(1)


def sds_direction(models: DiffusionModels, x01: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
    """g_sds = (dz/dx)^T (f_theta(z_t, t, c) - y_t): the encoder's vector-Jacobian product.

    The UNet runs without autograd, so nothing of it is kept for the backward pass.
    """
    z = encode(models, x01)
    (grad,) = torch.autograd.grad(z, x01, grad_outputs=sds_residual(models, z, inputs))
    return grad


def input_grad(loss: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss.sum(), x01)
    return grad


# --------------------------------------------------------------------------- methods


class Method:
    """A protection objective: `direction(x01, inputs)` is the signed PGD step direction."""

    name: str = ""
    ascend: bool = False  # True: x <- x + alpha sign(g); False: x <- x - alpha sign(g)
    needs_target: bool = False
    summary: str = ""

    def grad(self, models: DiffusionModels, x01: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        raise NotImplementedError

    def objective(self, models: DiffusionModels, x01: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """The loss this method ascends or descends, per sample (for logs and tests)."""
        raise NotImplementedError

    def direction(self, models: DiffusionModels, x01: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        g = self.grad(models, x01, inputs)
        return g if self.ascend else -g


class AdvDM(Method):
    name, ascend = "advdm", True
    summary = "maximise L_sem with the full gradient (UNet + encoder); the classic attack"

    def objective(self, models, x01, inputs):
        return semantic_loss(models, encode(models, x01), inputs)

    def grad(self, models, x01, inputs):  # dL_sem/dx through the UNet and the encoder
        return input_grad(self.objective(models, x01, inputs), x01)


class AdvDMMinus(AdvDM):
    name, ascend = "advdm-", False
    summary = "minimise L_sem with the full gradient; smoother-looking than advdm"


class PhotoGuard(Method):
    name, ascend, needs_target = "photoguard", False, True
    summary = "encoder attack: pull E(x) toward E(target); cheap, no UNet"

    def objective(self, models, x01, inputs):
        return textural_loss(encode(models, x01), inputs.target_latent)

    def grad(self, models, x01, inputs):  # dL_tex/dx through the encoder only
        return input_grad(self.objective(models, x01, inputs), x01)


class Mist(Method):
    name, ascend, needs_target = "mist", False, True
    summary = "minimise L_tex - w L_sem (w = 1e4): textural + semantic, full gradient"

    def __init__(self, weight: float = 1e4):
        self.weight = weight

    def objective(self, models, x01, inputs):
        z = encode(models, x01)
        return textural_loss(z, inputs.target_latent) - self.weight * semantic_loss(models, z, inputs)

    def grad(self, models, x01, inputs):
        return input_grad(self.objective(models, x01, inputs), x01)


class SDSPlus(Method):
    name, ascend = "sds+", True
    summary = "ascend L_sem with the SDS gradient (encoder Jacobian only)"

    def objective(self, models, x01, inputs):
        return semantic_loss(models, encode(models, x01), inputs)

    def grad(self, models, x01, inputs):
        return sds_direction(models, x01, inputs)


class SDSMinus(SDSPlus):
    name, ascend = "sds-", False
    summary = "descend L_sem with the SDS gradient: the paper's recommended default"


class SDSTMinus(Method):
    """SDS(-) plus the textural term: x <- x - alpha sign(r g_sds + dL_tex/dx).

    Both terms are descended: L_sem as in SDS(-), L_tex as in PhotoGuard (pull E(x) toward E(y)).
    The reference writes the step as sign(r g_sds - g_tex); we read that with its own sign
    convention for g_sds, and keep the one that descends both losses, as the name says.
    """

    name, ascend, needs_target = "sdst-", False, True
    summary = "SDS(-) plus the textural term (r = 5): strongest on SDEdit/inpainting"

    def __init__(self, rate: float = 5.0):
        self.rate = rate

    def objective(self, models, x01, inputs):
        z = encode(models, x01)
        return self.rate * semantic_loss(models, z, inputs) + textural_loss(z, inputs.target_latent)

    def grad(self, models, x01, inputs):  # r * g_sds + dL_tex/dx, both through the encoder only
        z = encode(models, x01)
        residual = sds_residual(models, z, inputs)
        tex_grad_z = 2 * (z.float() - inputs.target_latent.float())  # d L_tex / d z
        (grad,) = torch.autograd.grad(z, x01, grad_outputs=self.rate * residual + tex_grad_z.to(z.dtype))
        return grad


METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (AdvDM, AdvDMMinus, PhotoGuard, Mist, SDSPlus, SDSMinus, SDSTMinus)
}
GRADIENT_METHODS = tuple(METHODS)


def make_method(name: str, mist_weight: float = 1e4, sdst_rate: float = 5.0) -> Method:
    if name == "mist":
        return Mist(mist_weight)
    if name == "sdst-":
        return SDSTMinus(sdst_rate)
    try:
        return METHODS[name]()
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None
