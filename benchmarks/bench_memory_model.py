"""Estimate GPU memory of one protection step without a GPU, by counting bytes.

A PGD step's peak GPU memory is about
    weights on the device + activations autograd saves for the backward + the largest transient.
This script measures the first two exactly for a given model, dtype and resolution by running the
step's forward on CPU with `torch.autograd.graph.saved_tensors_hooks` (each saved storage counted
once), and reports them per method. Transients (one layer's workspace, the attention scores when no
fused attention kernel is used) come on top; on a GPU, measure for real with bench_methods.py.

    python benchmarks/bench_memory_model.py --model sd15-arch --resolution 512 --dtype bf16
    python benchmarks/bench_memory_model.py --model sdxl-arch --resolution 1024 --dtype fp16 --meta

`--meta` builds a built-in architecture on PyTorch's meta device and runs the same step there:
shapes, dtypes and autograd's saved tensors are exactly those of a real run, but nothing is
computed or allocated, so SDXL at 1024 x 1024 is counted in seconds on a laptop (the real run
needs ~20 GB of CPU memory and minutes). `--check` counts both ways and reports whether they agree.
With fp16, SDXL's VAE is kept in fp32 (models.py), and its activations are counted at 4 bytes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.models.loading import assemble_models, load_models, resolve_dtype
from pipeline.protect import ProtectConfig, build_protector
from pipeline.protect.methods import StepInputs, encode, predict


def meta_models(name: str, dtype: str, low_memory: bool):
    """A built-in architecture on the meta device (no weights allocated, nothing computed)."""
    from pipeline.models.builtin.build import build_pipeline

    device = torch.device("meta")
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        pipe = build_pipeline(name).to(dtype=dtype)
    return assemble_models(name, "meta", type(pipe).__name__, pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer,
                           pipe.scheduler, device, dtype, getattr(pipe, "text_encoder_2", None),
                           getattr(pipe, "tokenizer_2", None), low_memory=low_memory)


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def saved_bytes_of_step(protector, x01: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one step of the protector's method."""
    models = protector.models
    storages: dict[int, int] = {}  # keyed by the storage itself (works on the meta device, where data_ptr is 0)
    weights = {p.untyped_storage()._cdata for m in (models.vae, models.unet) for p in m.parameters()}
    saved_refs = []  # keep saved tensors alive so no storage address is reused while counting

    def pack(t: torch.Tensor):
        key = t.untyped_storage()._cdata
        if key not in weights:  # weights are counted once, as weights
            storages[key] = t.untyped_storage().nbytes()
            saved_refs.append(t)
        return t

    size = tuple(x01.shape[2:])
    latent = (1, models.latent_channels, size[0] // models.vae_factor, size[1] // models.vae_factor)
    inputs = StepInputs(
        cond=models.encode_prompts(["a photo"]),
        t=torch.tensor([500], device=models.device),
        noise=torch.randn(latent).to(models.device, models.dtype),
        target_latent=protector.target_latent(size),
        added_cond=models.added_conditioning(["a photo"], *size),
    )
    x = x01.to(models.device).clone().requires_grad_(True)
    method = protector.method
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if method.name.startswith("sds"):  # SDS: the encoder's graph only; the UNet runs under no_grad
            z = encode(models, x)
            with torch.no_grad():
                predict(models, z.detach(), inputs)
        else:
            method.objective(models, x, inputs)
    return sum(storages.values())


def text_bytes(models) -> int:
    return sum(module_bytes(m) for m in (models.text_encoder, models.text_encoder_2) if m is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-arch")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", help="2-byte dtype stands for fp16/bf16 on a GPU")
    parser.add_argument("--methods", default="sds-,advdm,photoguard")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--meta", action="store_true", help="count on the meta device (built-ins only; see above)")
    parser.add_argument("--check", action="store_true", help="count on CPU and on the meta device, compare")
    args = parser.parse_args()
    rows = []
    modes = ["cpu", "meta"] if args.check else ["meta" if args.meta else "cpu"]
    for low_memory in (False, True):
        for mode in modes:
            if mode == "meta":
                models = meta_models(args.model, args.dtype, low_memory)
            else:
                models = load_models(args.model, device="cpu", dtype=args.dtype, low_memory=low_memory)
            # protection needs the encoder and the UNet on the GPU (and the text encoders unless offloaded)
            weights = module_bytes(models.vae.encoder) + module_bytes(models.vae.quant_conv) + module_bytes(models.unet)
            if not low_memory:
                weights += text_bytes(models)
            x = torch.rand(1, 3, args.resolution, args.resolution)
            for name in args.methods.split(","):
                if low_memory and not name.startswith("sds"):
                    continue
                protector = build_protector(models, ProtectConfig(method=name, steps=1))
                start = time.perf_counter()
                saved = saved_bytes_of_step(protector, x)
                rows.append({
                    "method": name, "low_memory": low_memory, "model": args.model, "resolution": args.resolution,
                    "dtype": args.dtype, "vae_dtype": str(models.vae.dtype).replace("torch.", ""), "counted_on": mode,
                    "weights_GiB": round(weights / 2**30, 3), "saved_activations_GiB": round(saved / 2**30, 3),
                    "estimate_GiB": round((weights + saved) / 2**30, 3), "saved_bytes": saved,
                    f"forward_s_{mode}": round(time.perf_counter() - start, 1),
                })
                print(json.dumps(rows[-1]), flush=True)
            del models
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
