"""ASPL (Anti-DreamBooth) against uniform noise of the same budget, on its own objective, on the style world.

    python -m benchmarks.bench_aspl            # results/aspl_cpu.json

For each of the style world's first held-out artists (tiny-style, 4 images at 64 px, protected as one group),
ASPL at eps 16 (step 2) with the full and the LoRA surrogate, and uniform noise of the same budget; the
objective is the one a DreamBooth mimic meets: the denoising loss of a full copy of the UNet fine-tuned on the
(protected) set, after 0 and 20 steps at lr 1e-4 (aspl.mimic_loss; 16 fixed draws per image).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MIMICSHIELD_CACHE", str(ROOT / ".cache" / "mimicshield"))
RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None) -> int:
    import torch

    from pipeline.data.styles import HELD_OUT_STYLES, artist_images
    from pipeline.io.images import to_tensor
    from pipeline.models import load_models
    from pipeline.protect import ProtectConfig, build_protector
    from pipeline.protect.aspl import mimic_loss

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--artists", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="ASPL PGD steps (2 rounds of 6)")
    args = p.parse_args(argv)
    models = load_models("tiny-style", device="cpu", dtype="fp32")
    eps, out = 16, {"eps": 16, "steps": args.steps, "artists": {}}
    for i, style in enumerate(HELD_OUT_STYLES[: args.artists]):
        images = artist_images(style, 4, 64, seed=900 + i)
        keys = [f"{style.name}/{j}" for j in range(len(images))]
        rng = np.random.default_rng(i)
        sets = {"clean": images, "noise": [np.clip(x.astype(int) + rng.integers(-eps, eps + 1, x.shape), 0, 255)
                                           .astype(np.uint8) for x in images]}
        seconds = {}
        for surrogate in ("full", "lora"):
            config = ProtectConfig(method="aspl", eps=eps, steps=args.steps, step_size=2, aspl={"surrogate": surrogate})
            t = time.perf_counter()
            deltas = build_protector(models, config).protect(images, keys)
            seconds[surrogate] = round(time.perf_counter() - t, 2)
            sets[f"aspl-{surrogate}"] = [np.clip(x + np.rint(d), 0, 255).astype(np.uint8) for x, d in zip(images, deltas)]
        loss = {name: {steps: round(mimic_loss(models, torch.cat([to_tensor(x) for x in s]), ["a painting"] * 4, steps,
                                               1e-4), 4) for steps in (0, 20)} for name, s in sets.items()}
        out["artists"][style.name] = {"mimic_loss": loss, "protect_seconds": seconds}
        print(style.name, json.dumps(out["artists"][style.name]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "aspl_cpu.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
