"""What FastProtect reads from the VAE encoder: feature maps, pooled latents, latent entropy.

- Feature maps F_l: the outputs of the encoder's down blocks (`vae.encoder.down_blocks[l]`,
  l = 1..L; L = 4 for SD 1.x/2.x), caught with forward hooks while z = s * E(x) is computed.
  The paper says "intermediate VAE-encoder feature maps" without naming them: we take every
  down block's output (one map per resolution), not the mid block.
- Pooled latent: z average-pooled to a G x G grid (G = 8, or the latent side when smaller) and
  flattened. k-means runs on these vectors and inference assigns the nearest centroid. The
  paper clusters "VAE latents"; pooling (our choice) keeps centroids small and makes them
  independent of the training resolution.
- Latent entropy (the paper's criterion for choosing a target, not defined there): the Shannon
  entropy, in bits, of a 64-bin histogram of the latent's values over [-4, 4] (z is scaled to
  about unit variance by s; values outside fall in the edge bins). A flat image has a latent
  concentrated in a few bins (low entropy), a busy texture spreads it (high entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.models.loading import DiffusionModels
from pipeline.protect.fastprotect.recipe import CENTROID_GRID
from pipeline.protect.methods import encode

ENTROPY_BINS = 64
ENTROPY_RANGE = 4.0


class EncoderFeatures:
    """Context manager: forward hooks on `vae.encoder.down_blocks` collecting their outputs."""

    def __init__(self, vae: torch.nn.Module):
        self.blocks = list(vae.encoder.down_blocks)
        self.maps: list[torch.Tensor] = []
        self._handles = []

    def __enter__(self) -> "EncoderFeatures":
        self.maps = []
        self._handles = [b.register_forward_hook(self._keep) for b in self.blocks]
        return self

    def _keep(self, module, inputs, output):
        self.maps.append(output[0] if isinstance(output, tuple) else output)

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def feature_layer_names(models: DiffusionModels) -> list[str]:
    return [f"encoder.down_blocks.{i}" for i in range(len(models.vae.encoder.down_blocks))]


def encode_with_features(models: DiffusionModels, x01: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(z, [F_1 .. F_L]) for images x01 in [0, 1]: z = s * E(x) and the down blocks' outputs."""
    with EncoderFeatures(models.vae) as hooks:
        z = encode(models, x01)
    return z, hooks.maps


def pooled_latent(z: torch.Tensor, grid: int = CENTROID_GRID) -> torch.Tensor:
    """B x (C * g * g) float32: z average-pooled to g x g (g = min(grid, latent side))."""
    g = min(grid, z.shape[-2], z.shape[-1])
    return F.adaptive_avg_pool2d(z.float(), g).flatten(1)


def latent_entropy(z: torch.Tensor, bins: int = ENTROPY_BINS, value_range: float = ENTROPY_RANGE) -> torch.Tensor:
    """Per-sample Shannon entropy (bits) of the histogram of z's values (see module doc)."""
    values = z.detach().float().flatten(1).clamp(-value_range, value_range)
    index = ((values + value_range) / (2 * value_range) * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(values.shape[0], bins, device=values.device).scatter_add_(1, index, torch.ones_like(values))
    p = counts / counts.sum(1, keepdim=True)
    return -(p * torch.log2(p.clamp_min(1e-12))).sum(1)
