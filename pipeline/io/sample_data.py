"""Sample WebDataset shards built from scikit-image's bundled photos (demo, tests, benchmarks).

`photo_samples(n, sizes)` crops and resizes the photos into small images of several sizes;
`bad_samples()` gives one of each kind of bad input the pipeline must turn into an error row;
`shard_bytes(samples)` packs samples into a WebDataset tar (``<key>.<suffix>`` members).
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


def _photos() -> list[np.ndarray]:
    from pipeline.data.photos import load_photo

    return [load_photo(name) for name in PHOTOS]


def png_bytes(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def photo_samples(n: int, sizes=((64, 64),), prefix: str = "img", formats=("PNG",)) -> list[dict]:
    """`n` samples: dicts with key, png/jpg bytes and a JSON member (caption, source photo)."""
    photos = _photos()
    samples = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = sizes[i % len(sizes)]
        side = min(photo.shape[:2])
        top = (i * 37) % (photo.shape[0] - side + 1)
        crop = Image.fromarray(photo[top : top + side, :side]).resize((w, h), Image.BICUBIC)
        fmt = formats[i % len(formats)]
        ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
        meta = {"caption": f"a photo of {PHOTOS[i % len(PHOTOS)]}", "index": i}
        samples.append({"__key__": f"{prefix}{i:05d}", ext: png_bytes(np.asarray(crop), fmt),
                        "json": json.dumps(meta).encode()})
    return samples


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_samples(good_png: bytes) -> list[dict]:
    """One sample of each bad kind: corrupt, truncated, zero-byte, not an image, bomb, no image."""
    corrupt = bytearray(good_png)
    corrupt[60:400] = bytes(340)  # header intact, compressed data destroyed
    return [
        {"__key__": "bad-corrupt", "png": bytes(corrupt)},
        {"__key__": "bad-truncated", "png": good_png[: len(good_png) // 2]},
        {"__key__": "bad-empty", "png": b""},
        {"__key__": "bad-notimage", "png": b"this is not an image, just text\n" * 4},
        {"__key__": "bad-bomb", "png": bomb_png()},
        {"__key__": "bad-noimage", "txt": b"a sample without any image member"},
    ]


def shard_bytes(samples: list[dict]) -> bytes:
    """A WebDataset tar: each sample's members as ``<key>.<suffix>``, samples in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for suffix, data in sample.items():
                if suffix == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{suffix}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def style_world_images(per_artist: int = 8, artists: int = 8, size: int = 64, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """The built-in style world's first `artists` held-out artists: {artist name: `per_artist` images}."""
    from pipeline.data.styles import HELD_OUT_STYLES, artist_images

    return {style.name: artist_images(style, per_artist, size, seed=seed + 100 + a)
            for a, style in enumerate(HELD_OUT_STYLES[:artists])}


def write_style_world(out: str, per_artist: int = 8, artists: int = 8, size: int = 64, seed: int = 0) -> list[str]:
    """The held-out artists as a folder archive: OUT/<artist>/<i>.png (evaluate and study them with
    ``--model tiny-style --group-by folder``); returns the artists' names."""
    from pathlib import Path

    world = style_world_images(per_artist, artists, size, seed)
    for name, images in world.items():
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            (folder / f"{i}.png").write_bytes(png_bytes(img))
    return list(world)


def style_world_samples(per_artist: int = 8, artists: int = 2, size: int = 64, seed: int = 0) -> list[dict]:
    """The same artists as WebDataset samples, the artist in each sample's JSON (``--group-by artist``)."""
    return [{"__key__": f"{name}-{i:03d}", "png": png_bytes(img),
             "json": json.dumps({"artist": name, "caption": f"a painting by {name}"}).encode()}
            for name, images in style_world_images(per_artist, artists, size, seed).items()
            for i, img in enumerate(images)]


if __name__ == "__main__":  # python -m pipeline.io.sample_data style-world DIR [PER_ARTIST] [ARTISTS]
    import sys

    if len(sys.argv) < 3 or sys.argv[1] != "style-world":
        sys.exit("usage: python -m pipeline.io.sample_data style-world DIR [PER_ARTIST] [ARTISTS]")
    made = write_style_world(sys.argv[2], *(int(a) for a in sys.argv[3:5]))
    print(f"{len(made)} artists under {sys.argv[2]}: {', '.join(made)}")
