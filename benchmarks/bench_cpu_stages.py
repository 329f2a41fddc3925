"""CPU cost per image of the work around the protector, by stage (issue 37): what one core spends on each image.

Per size (256^2 .. 2048^2, a real photo resized) and source format (PNG; JPEG q90 4:2:0), with a +-eps perturbation
(the protector's output, as the encode stage receives it), one thread, best of `--repeats`:

    decode    decode_image of the source bytes (what the Decoder task does)
    apply     apply_perturbation (the quantised perturbation onto the decoded pixels)
    encode    PNG at zlib levels 1, 3, 6 (Pillow's default), 9; JPEG: the coefficient path (io/jpeg.py)
    decode2   decoding the written file (today's measure of what was written)
    measure   L-inf, PSNR, SSIM of the written pixels against the source's

    python benchmarks/bench_cpu_stages.py            (alone: figures taken under load are not figures)

Prints a Markdown table (milliseconds of one core) and the PNG size per zlib level. Results also in
benchmarks/results/cpu_stages.md.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from pipeline.io.images import apply_perturbation, decode_image, encode_image
from pipeline.metrics.visibility import linf, psnr, ssim
from pipeline.protect.encoded import finish

RESULTS = Path(__file__).resolve().parent / "results"
EPS = 8


def best_ms(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000, out


def source(side: int, fmt: str) -> bytes:
    img = Image.fromarray(data.astronaut()).resize((side, side), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90, "subsampling": 2} if fmt == "JPEG" else {}))
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    lines = ["| size | source | decode | apply | encode | decode2 | measure (SSIM of it) | finish() in all |",
             "|---|---|---|---|---|---|---|---|"]
    png_lines = ["| size | zlib level | ms | KiB |", "|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for side in a.sizes:
        for fmt in ("PNG", "JPEG"):
            raw = source(side, fmt)
            dec_ms, image = best_ms(lambda: decode_image(raw), a.repeats)
            delta = rng.choice([-EPS, EPS], size=image.rgb.shape).astype(np.float32)
            app_ms, pixels = best_ms(lambda: apply_perturbation(image, delta, EPS), a.repeats)
            if fmt == "PNG":
                for level in (1, 3, 6, 9):
                    def enc(level=level):
                        buf = io.BytesIO()
                        Image.fromarray(pixels).save(buf, format="PNG", compress_level=level)
                        return buf.getvalue()
                    ms, out = best_ms(enc, a.repeats)
                    png_lines.append(f"| {side} | {level} | {ms:.0f} | {len(out) / 1024:.0f} |")
                enc_ms, written = best_ms(lambda: encode_image(image, pixels), a.repeats)
            else:
                enc_ms, result = best_ms(lambda: finish("k", image, delta, EPS), a.repeats)
                written = result.data
            dec2_ms, back = best_ms(lambda: decode_image(written).rgb, a.repeats)
            ssim_ms, _ = best_ms(lambda: ssim(image.rgb, back), a.repeats)
            meas_ms, _ = best_ms(lambda: (linf(image.rgb, back), psnr(image.rgb, back), ssim(image.rgb, back)),
                                 a.repeats)
            all_ms, _ = best_ms(lambda: finish("k", image, delta, EPS), a.repeats)
            note = " (finish: apply+encode+measure)" if fmt == "JPEG" else ""
            lines.append(f"| {side}^2 | {fmt} | {dec_ms:.0f} | {app_ms:.0f} | {enc_ms:.0f}{note} | {dec2_ms:.0f} | "
                         f"{meas_ms:.0f} ({ssim_ms:.0f}) | {dec_ms + all_ms:.0f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n\nPNG encoding of the protected pixels by zlib level (Pillow's default: 6):\n\n" + \
        "\n".join(png_lines) + "\n"
    print()
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_stages.md").write_text(text)


if __name__ == "__main__":
    main()
