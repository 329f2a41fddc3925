"""`impress:STEPS`: IMPRESS, optimise x' for autoencoder consistency while staying close to the input.

Source: Cao et al., "IMPRESS: Evaluating the resilience of imperceptible perturbations against
unauthorized data usage in diffusion-based generative AI" (NeurIPS 2023):

    min_x'  || x' - D(E(x')) ||_2^2  +  alpha * max(LPIPS(x', x) - Delta, 0)

A protection lives where the image and its VAE reconstruction disagree; removing that
inconsistency removes the protection. Here the LPIPS hinge is replaced by alpha || x' - x ||_2^2
(alpha = 1): our LPIPS backbone is random unless calibrated weights are given, and an L2
proximity keeps the purification well defined everywhere. Adam, learning rate 0.01 in [0, 1]
units, STEPS steps, with the mimic's own VAE (`PurifyContext.model`), at the image's size padded
to the VAE's multiple. Deterministic. More steps: stronger purification.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.io.images import to_tensor, to_uint8
from pipeline.models.loading import load_models
from pipeline.study.purify.base import Purification

ALPHA = 1.0  # weight of the proximity term
LEARNING_RATE = 0.01


def vae_models(context):
    return context.get("models", lambda: load_models(context.model, device=context.device, dtype=context.dtype))


class Impress(Purification):
    name = "impress"
    needs_model = True

    def check(self):
        if self.param != int(self.param) or self.param < 0:
            raise ValueError(f"impress:STEPS needs a whole number of steps >= 0, got {self.param:g}")

    def one(self, rgb, seed, context):
        if self.param == 0:
            return rgb.copy()
        models = vae_models(context)
        vae, m = models.vae, models.vae_factor
        x = to_tensor(rgb).to(models.device)
        h, w = x.shape[2:]
        x = F.pad(x, (0, -w % m, 0, -h % m), mode="replicate")
        x_pur = x.clone().requires_grad_(True)
        opt = torch.optim.Adam([x_pur], lr=LEARNING_RATE)
        for _ in range(int(self.param)):
            xin = (x_pur * 2 - 1).to(models.dtype)
            recon = (vae.decode(vae.encode(xin).latent_dist.mean).sample.float() + 1) / 2
            loss = (x_pur - recon).pow(2).mean() + ALPHA * (x_pur - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x_pur.clamp_(0, 1)
        return to_uint8(x_pur[:, :, :h, :w])


UNIT = Impress
