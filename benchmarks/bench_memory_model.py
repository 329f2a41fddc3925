"""Estimate GPU memory of one protection step without a GPU, by counting bytes.

A PGD step's peak GPU memory is about
    weights on the device + activations autograd saves for the backward + the largest transient.
This script measures the first two exactly for a given model, dtype and resolution by running the
step's forward on CPU with `torch.autograd.graph.saved_tensors_hooks` (each saved storage counted
once), and reports them per method. Transients (one layer's workspace, the attention scores when no
fused attention kernel is used) come on top; on a GPU, measure for real with bench_methods.py.

    python -m benchmarks.bench_memory_model --model sd15-arch --resolution 512 --dtype bf16
    python -m benchmarks.bench_memory_model --model sdxl-arch --resolution 1024 --dtype fp16 --meta

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

from pipeline.models.loading import load_models
from pipeline.protect import ProtectConfig, build_protector
from pipeline.protect.memory import (
    meta_models,
    module_bytes,
    saved_bytes_of_step,
    text_bytes,
)


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
            # protection needs the encoder and the denoiser (UNet or transformer) on the GPU (and the text encoders unless offloaded)
            weights = sum(module_bytes(m) for m in (models.vae.encoder, models.vae.quant_conv, models.unet) if m is not None)
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
