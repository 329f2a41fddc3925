"""Estimate GPU memory of one protection step without a GPU, by counting bytes.

A PGD step's peak GPU memory is about
    weights on the device + activations autograd saves for the backward + the largest transient.
This script measures the first two exactly for a given model, dtype and resolution by running the
step's forward on CPU with `torch.autograd.graph.saved_tensors_hooks` (each saved storage counted
once), and reports them per method. Transients (one layer's workspace, the attention scores when no
fused attention kernel is used) come on top; on a GPU, measure for real with bench_methods.py.

    python benchmarks/bench_memory_model.py --model sd15-arch --resolution 512 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.models import load_models
from pipeline.protect import ProtectConfig, build_protector
from pipeline.protect.methods import StepInputs


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def saved_bytes_of_step(protector, x01: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one step of the protector's method."""
    models = protector.models
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for m in (models.vae, models.unet) for p in m.parameters()}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:  # weights are counted once, as weights
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    size = tuple(x01.shape[2:])
    latent = (1, 4, size[0] // models.vae_factor, size[1] // models.vae_factor)
    inputs = StepInputs(
        cond=models.encode_prompts(["a photo"]),
        t=torch.tensor([500]),
        noise=torch.randn(latent).to(models.dtype),
        target_latent=protector.target_latent(size),
    )
    x = x01.clone().requires_grad_(True)
    method = protector.method
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if method.name.startswith("sds"):  # SDS: the encoder's graph only; the UNet runs under no_grad
            from pipeline.protect.methods import encode, predict_noise

            z = encode(models, x)
            with torch.no_grad():
                predict_noise(models, z.detach(), inputs)
        else:
            method.objective(models, x, inputs)
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-arch")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", help="2-byte dtype stands for fp16/bf16 on a GPU")
    parser.add_argument("--methods", default="sds-,advdm,photoguard")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    rows = []
    for low_memory in (False, True):
        models = load_models(args.model, device="cpu", dtype=args.dtype, low_memory=low_memory)
        # protection needs the encoder and the UNet on the GPU (and the text encoder unless offloaded)
        weights = module_bytes(models.vae.encoder) + module_bytes(models.vae.quant_conv) + module_bytes(models.unet)
        if not low_memory:
            weights += module_bytes(models.text_encoder)
        x = torch.rand(1, 3, args.resolution, args.resolution)
        for name in args.methods.split(","):
            if low_memory and not name.startswith("sds"):
                continue
            protector = build_protector(models, ProtectConfig(method=name, steps=1))
            start = time.perf_counter()
            saved = saved_bytes_of_step(protector, x)
            rows.append({
                "method": name, "low_memory": low_memory, "model": args.model, "resolution": args.resolution,
                "dtype": args.dtype, "weights_GiB": round(weights / 2**30, 3), "saved_activations_GiB": round(saved / 2**30, 3),
                "estimate_GiB": round((weights + saved) / 2**30, 3), "forward_s_cpu": round(time.perf_counter() - start, 1),
            })
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
