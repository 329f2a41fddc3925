"""Does protection stop style mimicry by fine-tuning? LoRA and textual inversion on held-out artists (not a test).

On the built-in ``tiny-style`` model (pipeline/train/style.py), for each of the style
world's held-out artists (styles.HELD_OUT_STYLES, never seen in training), `--images` images of the
artist at 64 px (the style on crops of photos no built-in trained on):

- protect them with every method at each budget (PGD `--steps` steps of `--step-size`), and with
  uniform noise U(-eps, eps) of the same budget (``noise``);
- train each mimic (LoRA: `--lora-steps`; textual inversion: `--ti-steps`) once on the clean images and
  once per protected set (same seed, same prompts), and generate `--generate` images from
  "a painting in the style of <token>";
- judge the generated images with the style score (metrics/style.py) among the 8 held-out artists'
  references (other content, `reference_styles("builtin")`): **style accuracy** (fraction attributed
  to the artist; chance 1/8) and **style distance** (to the artist's prototype, in units of its
  references' spread).

Protection works when the protected-trained mimic's accuracy falls (and distance rises) more than
noise's does. The paper's claims are checked with the table: SDS(-) protects against textual
inversion (Diff-Protect), FastProtect against LoRA (FastProtect's main attack).

    python -m benchmarks.bench_style_mimicry                               # every method, eps 8 and 16
    python -m benchmarks.bench_style_mimicry --methods sds- --eps 16 --artists 2 --name quick

Results: benchmarks/results/<name>.json and .md (default name style_mimicry_cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from benchmarks.results_writer import machine_lines, write_results
from pipeline.protect.baseline import apply_deltas, uniform_noise  # the same noise and rounding as the SDEdit figures

METHODS = ("advdm", "advdm-", "photoguard", "mist", "sds+", "sds-", "sdst-", "fastprotect")
MODEL = "tiny-style"


def mimics(args):
    from pipeline.evaluate.mimic import Lora, LoraConfig, TextualInversion, TextualInversionConfig

    out = {}
    if args.lora_steps:
        out["lora"] = Lora(MODEL, LoraConfig(steps=args.lora_steps, num_images=args.generate, rank=args.lora_rank,
                                             learning_rate=args.lora_lr, seed=args.seed), device="cpu")
    if args.ti_steps:
        out["textual_inversion"] = TextualInversion(
            MODEL, TextualInversionConfig(steps=args.ti_steps, num_images=args.generate, learning_rate=args.ti_lr,
                                          seed=args.seed), device="cpu")
    return out


def judge_set(judge, images, artist) -> dict:
    scores = judge.score(images, artist)
    return {"style_accuracy": float(np.mean(scores["style_match"])),
            "style_distance": float(np.mean(scores["style_distance"]))}


def run(args) -> dict:
    import torch

    from pipeline.data.styles import HELD_OUT_STYLES, artist_images
    from pipeline.metrics.style import StyleDescriptor, StyleJudge, reference_styles
    from pipeline.models.loading import load_models
    from pipeline.protect import ProtectConfig, build_protector

    if args.threads:
        torch.set_num_threads(args.threads)
    models = load_models(MODEL, device="cpu", dtype="fp32")
    judge = StyleJudge(StyleDescriptor(), reference_styles("builtin"), 64)
    trainers = mimics(args)
    rows, cell_seconds = [], {name: [] for name in trainers}
    for a_index, style in enumerate(HELD_OUT_STYLES[: args.artists]):
        images = artist_images(style, args.images, 64, seed=100 + a_index)
        keys = [f"{style.name}/{i}" for i in range(len(images))]
        sets = {("none", 0.0): (images, 0.0)}
        for eps in args.eps:
            for method in ("noise",) + tuple(args.methods):
                start = time.perf_counter()
                if method == "noise":
                    deltas = uniform_noise(images, eps, args.seed)
                else:
                    cfg = ProtectConfig(method=method, eps=eps, steps=args.steps, step_size=args.step_size,
                                        seed=args.seed)
                    deltas = build_protector(models, cfg).protect(images, keys)
                sets[(method, float(eps))] = (apply_deltas(images, deltas), time.perf_counter() - start)
        for (method, eps), (protected, protect_seconds) in sets.items():
            for name, mimic in trainers.items():
                start = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    out, _ = mimic.run(protected, style.name, "clean" if method == "none" else "protected", tmp)
                seconds = time.perf_counter() - start
                cell_seconds[name].append(seconds)
                row = {"artist": style.name, "mimic": name, "method": method, "eps": eps,
                       **judge_set(judge, out.images, style.name), "cell_seconds": seconds,
                       "protect_seconds": protect_seconds}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"rows": rows, "seconds_per_cell": {k: float(np.mean(v)) for k, v in cell_seconds.items() if v},
            "calibrated": False}


def table(rows: list[dict]) -> list[dict]:
    """Rows averaged over artists: one per (mimic, method, eps)."""
    out = {}
    for r in rows:
        out.setdefault((r["mimic"], r["method"], r["eps"]), []).append(r)
    return [{"mimic": m, "method": meth, "eps": eps, "artists": len(rs),
             "style_accuracy": float(np.mean([r["style_accuracy"] for r in rs])),
             "style_distance": float(np.mean([r["style_distance"] for r in rs]))}
            for (m, meth, eps), rs in sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1]))]


def claims(avg: list[dict]) -> list[str]:
    at = {(r["mimic"], r["method"], r["eps"]): r for r in avg}
    out = []
    for mimic, method, paper in (("textual_inversion", "sds-", "Diff-Protect: SDS(-) protects against textual inversion"),
                                 ("lora", "fastprotect", "FastProtect: protects against LoRA personalisation")):
        clean = at.get((mimic, "none", 0.0))
        for eps in sorted({k[2] for k in at if k[2] > 0}):
            r, noise = at.get((mimic, method, eps)), at.get((mimic, "noise", eps))
            if not (clean and r and noise):
                continue
            drop, noise_drop = clean["style_accuracy"] - r["style_accuracy"], clean["style_accuracy"] - noise["style_accuracy"]
            holds = drop > noise_drop and drop > 0
            out.append(f"{paper} (eps {eps:g}): style accuracy {clean['style_accuracy']:.2f} clean -> "
                       f"{r['style_accuracy']:.2f} protected (noise of the same budget: {noise['style_accuracy']:.2f}); "
                       f"distance {clean['style_distance']:.2f} -> {r['style_distance']:.2f} (noise {noise['style_distance']:.2f}): "
                       f"{'holds' if holds else 'does not hold'} here")
    return out


def markdown(result: dict, args) -> str:
    avg = table(result["rows"])
    lines = [
        "# Style mimicry by fine-tuning on `tiny-style` (held-out artists, CPU)",
        "",
        f"- artists: {args.artists} of the style world's 8 held-out styles, {args.images} images each at 64 px "
        f"(photos no built-in trained on); the judge's candidates: all 8 held-out styles (chance {1 / 8:.3f})",
        f"- protection: {args.steps} PGD steps of {args.step_size:g} (0-255 units), seed {args.seed}; "
        "`noise` = uniform U(-eps, eps); `none` = trained on the clean images",
        f"- mimics: LoRA rank {args.lora_rank}, {args.lora_steps} steps, lr {args.lora_lr:g}; textual inversion "
        f"{args.ti_steps} steps, lr {args.ti_lr:g}; {args.generate} images generated per cell, 25 DDIM steps, guidance 7.5",
        "- style score: random conv Gram + palette descriptor (metrics/style.py; uncalibrated: a relative measure only)",
        "- seconds per cell (train + generate): " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds_per_cell"].items()),
        *machine_lines(args.threads),
        "",
        "| mimic | method | eps | style accuracy | style distance |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['mimic']} | {r['method']} | {r['eps']:g} | {r['style_accuracy']:.3f} | {r['style_distance']:.2f} |"
              for r in avg]
    lines += ["", "## The papers' claims on this model", ""] + [f"- {c}" for c in claims(avg)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--eps", nargs="+", type=float, default=[8.0, 16.0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--step-size", type=float, default=2.0)
    p.add_argument("--artists", type=int, default=4)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--generate", type=int, default=8)
    p.add_argument("--lora-steps", type=int, default=300)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--ti-steps", type=int, default=60)
    p.add_argument("--ti-lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="style_mimicry_cpu")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    write_results(args.name, {"args": vars(args), **result}, markdown(result, args))


if __name__ == "__main__":
    main()
