"""JPEG output within the budget: what it holds, what it costs, and how much protection it keeps (not a test).

Two parts, both through the job's own `protect/encoded.finish` (the JPEG path of io/jpeg.py):

1. ``photos``: scikit-image's photos (full size, 300-512 px) saved as JPEG the ways archives hold them (q75 4:2:0,
   q85 progressive 4:2:0, q92 4:4:4, q95 4:2:2, grey q90), perturbed with +-eps signs (the full-band worst
   case). Per source: max |written - source| for the old pixel re-encode and for the coefficient path,
   file size against the source's, seconds and decodes per image, the share of the perturbation kept (L2
   and correlation with the intended one), and what survives the platform's own re-save of the written file
   (Pillow, q75 / q85 / q95, 4:2:0): the share of the perturbation left in the re-saved file.
2. ``style``: the style world's held-out artists (tiny-style, 64 px), stored as JPEG q85 4:2:0; each method
   protects the decoded pixels once, written as PNG (``--jpeg-as png``) and as JPEG (the default); a LoRA
   mimic trained on each set (and on the clean JPEGs, and on equal-budget noise) paints the artist, judged by
   the style score (accuracy, chance 1/8): the JPEG output's retained damage = its accuracy drop / PNG's.
3. ``sdedit``: held-out photos (tiny, `--resolution` px) stored as JPEG q85 4:2:0, protected once, written as PNG
   and as JPEG; SDEdit damage (the mimic's PSNR against the clean image, below the clean mimic's) of each.

    python -m benchmarks.bench_jpeg_budget photos
    python -m benchmarks.bench_jpeg_budget sdedit                     # SDEdit damage from PNG vs JPEG output
    python -m benchmarks.bench_jpeg_budget style --artists 4 --methods sds- photoguard --eps 16
    python -m benchmarks.bench_jpeg_budget style --eot jpeg:80-90 --eot-only --name jpeg_budget_style_eot

Results: benchmarks/results/jpeg_budget_<part>.json and .md.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks.results_writer import machine_lines, write_results
from pipeline.io.images import apply_perturbation, decode_image, encode_image
from pipeline.protect.encoded import finish

SOURCES = {
    "q75 4:2:0": dict(quality=75, subsampling=2),
    "q85 prog 4:2:0": dict(quality=85, subsampling=2, progressive=True),
    "q92 4:4:4": dict(quality=92, subsampling=0),
    "q95 4:2:2": dict(quality=95, subsampling=1),
    "grey q90": dict(quality=90, grey=True),
}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def jpeg_bytes(rgb: np.ndarray, **params) -> bytes:
    grey = params.pop("grey", False)
    img = Image.fromarray(rgb).convert("L") if grey else Image.fromarray(rgb)
    buf = io.BytesIO()
    img.save(buf, "JPEG", **params)
    return buf.getvalue()


def kept(written: np.ndarray, clean: np.ndarray, intended: np.ndarray) -> tuple[float, float]:
    """(||got|| / ||intended||, cosine(got, intended)) of the perturbation a file carries."""
    got, want = written.astype(np.float64) - clean, intended.astype(np.float64)
    n_got, n_want = np.linalg.norm(got), np.linalg.norm(want)
    return float(n_got / n_want), float((got * want).sum() / max(n_got * n_want, 1e-9))


def resave(data: bytes, quality: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling=2)
    return decode_image(buf.getvalue()).rgb


def photos_part(args) -> dict:
    from skimage import data

    rng = np.random.default_rng(0)
    rows = []
    for name in PHOTOS:
        rgb = getattr(data, name)()
        rgb = np.repeat(rgb[..., None], 3, axis=2) if rgb.ndim == 2 else rgb[..., :3]
        for variant, params in SOURCES.items():
            source = jpeg_bytes(rgb, **params)
            image = decode_image(source)
            for eps in args.eps:
                delta = np.sign(rng.standard_normal(image.rgb.shape)) * eps
                intended = apply_perturbation(image, delta, eps).astype(np.int16)
                naive = decode_image(encode_image(image, intended.astype(np.uint8))).rgb
                start = time.perf_counter()
                res = finish(name, image, delta, eps)
                seconds = time.perf_counter() - start
                written = decode_image(res.data).rgb
                want = (intended if intended.ndim == 3 else intended[..., None]).astype(np.int16) - image.rgb
                l2, cos = kept(written, image.rgb, want)
                row = {"photo": name, "source": variant, "eps": float(eps), "pixels": int(image.rgb.shape[0] * image.rgb.shape[1]),
                       "linf_reencode": int(np.abs(naive.astype(int) - image.rgb).max()),
                       "linf_written": int(np.abs(written.astype(int) - image.rgb).max()),
                       "size_ratio": len(res.data) / len(source), "seconds": seconds, "kept_l2": l2, "kept_cos": cos}
                clean_saved = {q: resave(source, q) for q in args.resave}
                for q in args.resave:  # the platform re-saves both: what is left of the perturbation
                    row[f"resave{q}_l2"], row[f"resave{q}_cos"] = kept(resave(res.data, q), clean_saved[q], want)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"rows": rows}


def style_part(args) -> dict:
    import torch

    from pipeline.data.styles import HELD_OUT_STYLES, artist_images
    from pipeline.evaluate.mimic import Lora, LoraConfig
    from pipeline.metrics.style import StyleDescriptor, StyleJudge, reference_styles
    from pipeline.models.loading import load_models
    from pipeline.protect import ProtectConfig, build_protector
    from pipeline.protect.baseline import uniform_noise

    torch.set_num_threads(args.threads)
    models = load_models("tiny-style", device="cpu", dtype="fp32")
    judge = StyleJudge(StyleDescriptor(), reference_styles("builtin"), 64)
    lora = Lora("tiny-style", LoraConfig(steps=args.lora_steps, num_images=args.generate, seed=0), device="cpu")
    rows = []
    for a, style in enumerate(HELD_OUT_STYLES[: args.artists]):
        sources = [jpeg_bytes(img, quality=85, subsampling=2) for img in artist_images(style, args.images, 64, seed=100 + a)]
        images = [decode_image(s) for s in sources]
        keys = [f"{style.name}/{i}" for i in range(len(images))]
        sets = {"clean": [im.rgb for im in images]}
        seconds = {}
        for eps in args.eps:
            methods = {"noise": uniform_noise([im.rgb for im in images], eps, 0)}
            for m in args.methods:
                for eot in ("", args.eot):  # `--eot`: the same method, robust to the source's own compression
                    if eot or not args.eot_only:
                        config = ProtectConfig(method=m, eps=eps, steps=args.steps, step_size=args.step_size, eot=eot)
                        methods[f"{m}+eot" if eot else m] = build_protector(models, config).protect(
                            [im.rgb for im in images], keys)
            for m, deltas in methods.items():
                for out in ("png", "jpeg"):
                    start = time.perf_counter()
                    done = [finish(k, im, d, eps, jpeg_as=out) for k, im, d in zip(keys, images, deltas)]
                    seconds[(m, eps, out)] = (time.perf_counter() - start) / len(done)
                    sets[(m, eps, out)] = [decode_image(r.data).rgb for r in done]
        for key, pixels in sets.items():
            with tempfile.TemporaryDirectory() as tmp:
                generated, _ = lora.run(pixels, style.name, "clean" if key == "clean" else "protected", tmp)
            accuracy = float(np.mean(judge.score(generated.images, style.name)["style_match"]))
            method, eps, out = ("none", 0.0, "jpeg") if key == "clean" else key
            rows.append({"artist": style.name, "method": method, "eps": float(eps), "output": out,
                         "style_accuracy": accuracy, "encode_seconds": seconds.get(key, 0.0)})
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def sdedit_part(args) -> dict:
    """SDEdit damage (tiny, held-out photos at `--resolution`, stored as JPEG q85 4:2:0) from PNG vs JPEG output."""
    import torch

    from benchmarks.bench_efficacy import Judge, held_out_uint8
    from pipeline.protect import ProtectConfig, build_protector
    from pipeline.protect.baseline import uniform_noise

    torch.set_num_threads(args.threads)
    sources = [jpeg_bytes(img, quality=85, subsampling=2) for img in held_out_uint8(args.resolution, 2)]
    images = [decode_image(s) for s in sources]
    clean = [im.rgb for im in images]
    keys = [f"held-out-{i}" for i in range(len(images))]
    judge = Judge(0.3, 20, None)
    clean_edit = judge.mimic(clean, keys)
    rows = [{"method": "none", "eps": 0.0, "output": "jpeg", **judge.damage(clean, clean_edit, clean_edit)}]
    for eps in args.eps:
        deltas = {"noise": uniform_noise(clean, eps, 0)}
        for m in args.methods:
            deltas[m] = build_protector(judge.models, ProtectConfig(method=m, eps=eps, steps=args.steps,
                                                                    step_size=args.step_size)).protect(clean, keys)
        for m, ds in deltas.items():
            for out in ("png", "jpeg"):
                written = [decode_image(finish(k, im, d, eps, jpeg_as=out).data).rgb for k, im, d in zip(keys, images, ds)]
                rows.append({"method": m, "eps": float(eps), "output": out,
                             **judge.damage(clean, judge.mimic(written, keys), clean_edit)})
                print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def markdown(part: str, result: dict, args) -> str:
    rows = result["rows"]
    lines = [f"# JPEG output within the budget: {part}", "", *machine_lines(args.threads), ""]
    if part == "photos":
        lines += ["Per JPEG variant, over the photos and budgets: the old pixel re-encode's worst |written - source| "
                  "against the coefficient path's; size against the source; the perturbation kept (L2 share, cosine "
                  "with the intended one); after the platform re-saves the written file (Pillow 4:2:0), the L2 share left.",
                  "", "| source | eps | L-inf re-encode | L-inf written | size x | ms / image | kept L2 | kept cos | "
                  + " | ".join(f"re-save q{q} L2" for q in args.resave) + " |",
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(args.resave)]
        for variant in SOURCES:
            for eps in args.eps:
                r = [x for x in rows if x["source"] == variant and x["eps"] == eps]
                lines.append(f"| {variant} | {eps:g} | {max(x['linf_reencode'] for x in r)} | "
                             f"{max(x['linf_written'] for x in r)} | {np.mean([x['size_ratio'] for x in r]):.2f} | "
                             f"{1000 * np.mean([x['seconds'] for x in r]):.0f} | {np.mean([x['kept_l2'] for x in r]):.2f} | "
                             f"{np.mean([x['kept_cos'] for x in r]):.2f} | "
                             + " | ".join(f"{np.mean([x[f'resave{q}_l2'] for x in r]):.2f}" for q in args.resave) + " |")
    elif part == "sdedit":
        base = rows[0]["mimic_psnr"]
        lines += [f"SDEdit (tiny, DDIM 20 steps, strength 0.3) of held-out photos at {args.resolution} px stored as JPEG "
                  f"q85 4:2:0; damage = clean mimic PSNR ({base:.2f} dB) - mimic PSNR against the clean image. "
                  "Retained = JPEG damage / PNG damage.", "",
                  "| method | eps | PNG damage (dB) | JPEG damage (dB) | retained |", "|---|---|---|---|---|"]
        for m in sorted({r["method"] for r in rows} - {"none"}, key=lambda m: (m != "noise", m)):
            for eps in args.eps:
                dmg = {r["output"]: base - r["mimic_psnr"] for r in rows if (r["method"], r["eps"]) == (m, eps)}
                ret = f"{dmg['jpeg'] / dmg['png']:.0%}" if dmg["png"] > 0.1 else "n/a"
                lines.append(f"| {m} | {eps:g} | {dmg['png']:.2f} | {dmg['jpeg']:.2f} | {ret} |")
    else:
        clean = np.mean([r["style_accuracy"] for r in rows if r["method"] == "none"])
        lines += [f"LoRA style accuracy (chance 0.125), {args.artists} held-out artists, sources JPEG q85 4:2:0; clean "
                  f"{clean:.2f}. Retained = (clean - JPEG output) / (clean - PNG output).", "",
                  "| method | eps | PNG output | JPEG output | retained | ms / image (JPEG) |", "|---|---|---|---|---|---|"]
        for m in sorted({r["method"] for r in rows} - {"none"}, key=lambda m: (m != "noise", m)):
            for eps in args.eps:
                acc = {o: np.mean([r["style_accuracy"] for r in rows if (r["method"], r["eps"], r["output"]) == (m, eps, o)])
                       for o in ("png", "jpeg")}
                ms = 1000 * np.mean([r["encode_seconds"] for r in rows if (r["method"], r["eps"], r["output"]) == (m, eps, "jpeg")])
                drop = clean - acc["png"]
                ret = f"{(clean - acc['jpeg']) / drop:.0%}" if drop > 0.05 else "n/a"  # no damage to keep
                lines.append(f"| {m} | {eps:g} | {acc['png']:.2f} | {acc['jpeg']:.2f} | {ret} | {ms:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["photos", "style", "sdedit"])
    p.add_argument("--resolution", type=int, default=64, help="sdedit: held-out photo crops at this size")
    p.add_argument("--eps", type=float, nargs="+", default=None)
    p.add_argument("--resave", type=int, nargs="+", default=[75, 85, 95])
    p.add_argument("--artists", type=int, default=4)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=["sds-", "photoguard"])
    p.add_argument("--eot", default="", help="also protect with this EOT (e.g. jpeg:80-90), as METHOD+eot")
    p.add_argument("--eot-only", action="store_true", help="with --eot: only the EOT variants of --methods")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--step-size", type=float, default=1.0)
    p.add_argument("--lora-steps", type=int, default=300)
    p.add_argument("--generate", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None, help="results name (default jpeg_budget_<part>)")
    args = p.parse_args(argv)
    args.eps = args.eps or ([8.0, 16.0] if args.part in ("photos", "sdedit") else [16.0])
    result = {"photos": photos_part, "style": style_part, "sdedit": sdedit_part}[args.part](args)
    write_results(args.name or f"jpeg_budget_{args.part}", {"args": vars(args), **result}, markdown(args.part, result, args))


if __name__ == "__main__":
    main()
