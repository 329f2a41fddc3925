"""LPIPS-alex built without any download, shared by the metrics and FastProtect's strength map.

The lpips package ships its linear heads (`weights/v0.1/alex.pth`); only the AlexNet trunk comes
from torchvision's ImageNet weights, which cannot be downloaded here. Pass their path
(torchvision's `alexnet-owt-7be5be79.pth` or a safetensors copy: keys `features.{i}.weight/bias`)
to get the calibrated LPIPS of the papers; without it the trunk is random but seeded, so results
are deterministic and marked uncalibrated by the callers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from pipeline.io.images import to_tensor

SEED = 0


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

    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # torchvision's `pretrained` deprecation notices
        torch.manual_seed(SEED)
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


@torch.no_grad()
def lpips_distance(net: torch.nn.Module, a, b) -> float:
    """LPIPS between two uint8 H x W x 3 images (0 for identical images)."""

    device = next(net.parameters()).device
    x, y = (to_tensor(img, device).mul(2).sub(1) for img in (a, b))  # LPIPS takes [-1, 1]
    return float(net(x, y).mean())
