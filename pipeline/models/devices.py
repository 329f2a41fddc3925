"""`--device` checked on the driver before Ray starts: asking for a GPU that is not there fails at once.

Without this a local run with ``--device cuda`` on a machine without CUDA waits forever for a GPU
resource that Ray will never have. Only local runs are checked here (no ``--address`` /
``RAY_ADDRESS``): on a cluster the driver is often a CPU head node and GPU workers may still be on
their way (autoscaling), so there the GPUs are the cluster's business.
"""

from __future__ import annotations


class DeviceError(ValueError):
    """The requested device does not exist on this machine; str() says what to use instead."""


def device_problem(device: str, cuda_devices: int, cuda_built: bool = True) -> str | None:
    """Why `device` cannot be used on a machine with `cuda_devices` visible GPUs (None when it can)."""
    device = str(device)
    if not device.startswith("cuda"):
        return None  # auto picks what is there; cpu and mps are not Ray resources
    if cuda_devices == 0:
        why = "this torch build has no CUDA support" if not cuda_built else "no CUDA GPU is visible on this machine"
        return (f"--device {device}: {why}. Use --device cpu (or auto), or run on a GPU machine or a Ray cluster "
                "with GPUs (--address)")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= cuda_devices:
        return (f"--device {device}: this machine has {cuda_devices} CUDA device(s) (cuda:0 to cuda:{cuda_devices - 1}); "
                "use one of those, or CUDA_VISIBLE_DEVICES to choose which GPU is cuda:0")
    return None


def check_local_device(device: str) -> None:
    """Raise `DeviceError` when `device` names a CUDA GPU this machine does not have."""
    if not str(device).startswith("cuda"):
        return
    import torch

    problem = device_problem(device, torch.cuda.device_count() if torch.cuda.is_available() else 0,
                             cuda_built=torch.backends.cuda.is_built())
    if problem:
        raise DeviceError(problem)
