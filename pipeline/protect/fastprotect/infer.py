"""FastProtect inference: protect any image with one encoder pass and one LPIPS pass.

For an image x (any H x W) and a bank trained at R x R with budget eta (bank.py):

1. x_R = x resized to R x R (bilinear, antialiased); z = s * E(x_R).
2. Group: k = nearest centroid of the pooled z (features.py).
3. Target: j = argmin_j |H(z) - H(z_yj)|, H the latent entropy (features.py).
4. d = S * (d_g^j + d_k^j) at R x R, with S = eps / eta: the bank's pattern scaled to the run's
   budget (S = 1 when --eps equals the training eta, as in the paper; the paper's S is not public).
5. Adaptive strength: M = LPIPS spatial map between x_R and clip(x_R + d) at R x R (at least
   64 x 64, AlexNet's minimum); m = (M - min M) / (max M - min M) per image; d <- (1 - m) * d,
   so the perturbation is weakest where LPIPS says a change is most visible (flat areas).
   The per-image min-max normalisation is our choice: it makes (1 - m) a [0, 1] weight whatever
   the LPIPS scale.
6. d is resized to H x W (bilinear, align_corners=False: convex weights, so it stays within the
   budget; no antialias, so small outputs keep the pattern's amplitude), in pixel units, and
   clamped to [-eps, eps].

LPIPS: spatial LPIPS-alex from pipeline.metrics.lpips (`lpips_of`, as the LPIPS metric computes it): the
lpips package's own linear heads and an AlexNet trunk that cannot be downloaded here, so by default it is
*random* (seeded, hence deterministic): the map is then uncalibrated, a proxy for visibility, not the
LPIPS of the paper.
Pass torchvision's AlexNet weights (`alexnet-owt-7be5be79.pth` or a safetensors copy) as
``config.fastprotect.lpips_weights`` (CLI: --lpips-weights) for the calibrated map.
`config.fastprotect.adaptive_strength = False` skips step 5 (ablation).

Everything is deterministic (no sampling); the run's `config.resolution` is not used (the bank
fixes R). `fastprotect+pgd` starts the PGD engine's `sds-` from FastProtect's perturbation and
runs `config.steps` steps of it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.io.images import resize_perturbation, resize_pixels, to_tensor
from pipeline.metrics.lpips import build_lpips as build
from pipeline.metrics.lpips import lpips_of
from pipeline.models.loading import DiffusionModels
from pipeline.protect.engine import ProtectConfig, Protector
from pipeline.protect.fastprotect.bank import DEFAULT_BANK_BUILTINS, FastProtectBank, load_bank_for
from pipeline.protect.fastprotect.features import latent_entropy, pooled_latent
from pipeline.protect.fastprotect.kmeans import nearest_centroid
from pipeline.protect.methods import encode

LPIPS_MIN_SIDE = 64


def build_lpips(weights: str | None = None, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, bool]:
    """(spatial LPIPS-alex module, calibrated?): see pipeline.metrics.lpips."""
    return build(weights, device, spatial=True)


class FastProtector:
    """The `fastprotect` method with the same interface as `pipeline.protect.Protector`."""

    def __init__(self, models: DiffusionModels, config: ProtectConfig, bank: FastProtectBank | None = None):
        self.models, self.config = models, config
        if bank is None:
            path = config.fastprotect.bank
            if path is None:
                build_default_bank(models)  # only the built-in tiny model's, and only once
            bank = load_bank_for(models, path)  # None: the default bank, or an error naming the command
        else:
            bank.check_model(models)
        self.bank = bank
        device = models.device
        self.perturbations = self.bank.perturbations.to(device).float()
        self.centroids = self.bank.centroids.to(device).float()
        self.target_entropies = self.bank.target_entropies.to(device).float()
        self.centroid_grid = int(self.bank.metadata.get("centroid_grid", 8))
        self.adaptive_strength = config.fastprotect.adaptive_strength
        self.lpips, self.lpips_calibrated = build_lpips(config.fastprotect.lpips_weights, device)

    @property
    def strength(self) -> float:
        """S = eps / eta (both in [0, 1] units): the bank's pattern fills the run's budget."""
        return self.config.eps / 255.0 / self.bank.eta

    @torch.no_grad()
    def assign(self, x_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(group k, target j) for each R x R image in x_r (B x 3 x R x R, [0, 1])."""
        z = encode(self.models, x_r)
        groups = nearest_centroid(pooled_latent(z, self.centroid_grid), self.centroids)
        targets = (latent_entropy(z)[:, None] - self.target_entropies[None]).abs().argmin(1)
        return groups, targets

    @torch.no_grad()
    def perturb_square(self, x_r: torch.Tensor) -> torch.Tensor:
        """B x 3 x R x R perturbations in [0, 1] units (steps 2-5 of the module doc)."""
        groups, targets = self.assign(x_r)
        d = self.strength * (self.perturbations[targets, 0] + self.perturbations[targets, 1 + groups])
        if not self.adaptive_strength:
            return d
        side = max(self.bank.resolution, LPIPS_MIN_SIDE)
        up = (lambda v: F.interpolate(v, size=(side, side), mode="bilinear", align_corners=False)) if side != x_r.shape[-1] else (lambda v: v)  # noqa: E731
        x_l = up(x_r.float())
        m = lpips_of(self.lpips, x_l, (x_l + up(d)).clamp(0, 1)).float()  # B x 1 x side x side
        if side != x_r.shape[-1]:
            m = F.interpolate(m, size=x_r.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
        lo = m.amin(dim=(1, 2, 3), keepdim=True)
        hi = m.amax(dim=(1, 2, 3), keepdim=True)
        m = torch.where(hi - lo > 1e-12, (m - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(m))
        return (1 - m) * d

    def protect(
        self,
        images: list[np.ndarray],
        keys: list[str] | None = None,
        prompts: list[str | None] | None = None,
    ) -> list[np.ndarray]:
        """Float H x W x 3 perturbations (pixel units, within config.eps) for uint8 H x W x 3 images."""
        if not images:
            return []
        r, eps = self.bank.resolution, self.config.eps
        x_r = torch.stack([square(rgb, r) for rgb in images]).to(self.models.device)
        d_r = self.perturb_square(x_r) * 255.0
        out = []
        for rgb, d in zip(images, d_r):
            h, w = rgb.shape[:2]
            full = resize_perturbation(d[None], (h, w))[0]
            out.append(full.clamp_(-eps, eps).permute(1, 2, 0).float().cpu().numpy())
        return out


def build_default_bank(models: DiffusionModels) -> None:
    """Train the built-in tiny (or tiny-style) model's default bank if it is missing (other models: nothing)."""
    if models.model_id in DEFAULT_BANK_BUILTINS:
        from pipeline.protect.fastprotect.train import (
            ensure_default_bank,  # training code only on this path, never to load a bank
        )

        ensure_default_bank(models)


def square(rgb: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 H x W x 3 -> float 3 x R x R in [0, 1] (bilinear, antialiased)."""
    return resize_pixels(to_tensor(rgb), (resolution, resolution))[0]


class FastProtectPGD:
    """`fastprotect+pgd`: FastProtect's perturbation as the start of `config.steps` steps of sds-."""

    def __init__(self, models: DiffusionModels, config: ProtectConfig, bank: FastProtectBank | None = None):
        self.models, self.config = models, config
        self.start = FastProtector(models, config, bank)
        self.engine = Protector(models, replace(config, method="sds-"))

    def protect(self, images, keys=None, prompts=None) -> list[np.ndarray]:
        starts = self.start.protect(images, keys, prompts)
        return self.engine.protect(images, keys, prompts, starts=starts)


def build_fastprotector(models: DiffusionModels, config: ProtectConfig):
    if config.method == "fastprotect":
        return FastProtector(models, config)
    if config.method == "fastprotect+pgd":
        return FastProtectPGD(models, config)
    raise ValueError(f"not a FastProtect method: {config.method!r}")
