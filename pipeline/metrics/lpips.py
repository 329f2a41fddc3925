"""LPIPS-alex built without any download: the `LPIPS` metric, and the network FastProtect's strength map uses.

The lpips package ships its linear heads (`weights/v0.1/alex.pth`); only the AlexNet trunk comes
from torchvision's ImageNet weights, which cannot be downloaded here. Pass their path
(torchvision's `alexnet-owt-7be5be79.pth` or a safetensors copy: keys `features.{i}.weight/bias`)
to get the calibrated LPIPS of the papers; without it the trunk is random but seeded, so results
are deterministic and the metric says ``calibrated = False``.

One computation: `lpips_of` (images in [0, 1] to LPIPS's [-1, 1]) serves the metric and the spatial map.
"""

from __future__ import annotations

import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from pipeline.io.images import to_tensor
from pipeline.metrics.base import PairMetric
from pipeline.seeds import seeded_global_rng

SEED = 0  # the random trunk's


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (never unpickling code)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def build_lpips(weights: str | None = None, device: torch.device | str = "cpu",
                spatial: bool = False) -> tuple[torch.nn.Module, bool]:
    """(frozen LPIPS-alex module, calibrated?): the package's heads, the trunk from `weights` or random."""
    import lpips

    with warnings.catch_warnings(), seeded_global_rng(SEED):
        warnings.simplefilter("ignore")  # torchvision's `pretrained` deprecation notices
        # pretrained=True: the heads shipped in the package; pnet_rand=True: never ask torchvision for weights
        net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, spatial=spatial, verbose=False)
    if weights:
        state = load_state_dict(weights)
        trunk = {}
        for name, _ in net.net.named_parameters():  # slice{k}.{i}.weight <- features.{i}.weight
            _, index, kind = name.split(".")
            trunk[name] = state[f"features.{index}.{kind}"]
        net.net.load_state_dict(trunk)
    net.requires_grad_(False)
    return net.eval().to(device), bool(weights)


def lpips_of(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS of images x, y (B x 3 x H x W in [0, 1]): B x 1 x 1 x 1, or B x 1 x H x W from a spatial net."""
    return net(x * 2 - 1, y * 2 - 1)  # LPIPS takes [-1, 1]


class LPIPS(PairMetric):
    """LPIPS-alex perceptual distance, averaged over the pairs; identical images give exactly 0 whatever the trunk."""

    name, higher_is_better = "lpips", False

    def __init__(self, weights: str | None = None, device: torch.device | str = "cpu"):
        self.weights, self.device = weights, torch.device(device)
        self.calibrated = weights is not None

    @cached_property
    def net(self) -> torch.nn.Module:
        return build_lpips(self.weights, self.device)[0]

    @torch.no_grad()
    def compute(self, images, references) -> float:
        values = []
        for x, y in zip(images, references):
            if np.array_equal(x, y):
                values.append(0.0)  # exactly, whatever the backbone
                continue
            # contiguous: a GPU's convolutions may round differently on another memory layout
            tx, ty = (to_tensor(img, self.device).contiguous() for img in (x, y))
            values.append(float(lpips_of(self.net, tx, ty).mean()))
        return float(np.mean(values))
