"""Helpers the tests share (one copy each): small real photos, files built by hand, a tar and the output
tables read back, one PGD step's draws, gradient comparison, protecting the small photos (the `protected`
fixture in conftest.py caches it). Where a test checks the code against an independent derivation, the
derivation lives here, written from the VAE and scheduler alone, never through pipeline code."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.protect.methods import StepInputs

SMALL_SIZE = 32  # small enough for a fast suite on 2 CPU cores; the tiny models work at any multiple of 16
SMALL_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
PROMPTS = ("a photo", "an artwork painting", "a photo", "an anime picture")  # step_inputs' prompts, in turn


def small_photos(size: int = SMALL_SIZE, names=SMALL_PHOTOS) -> list[np.ndarray]:
    """Real photos (scikit-image), the top-left square of each resized to size x size, uint8 RGB."""
    from skimage import data

    out = []
    for name in names:
        img = Image.fromarray(getattr(data, name)())
        side = min(img.size)
        img = img.crop((0, 0, side, side)).resize((size, size), Image.Resampling.LANCZOS)
        out.append(np.asarray(img.convert("RGB")))
    return out


def to_x01(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 H x W x 3 images -> float B x 3 x H x W in [0, 1] (written here, not through pipeline.io.images)."""
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])


def independent_encode(models, x01: torch.Tensor) -> torch.Tensor:
    """z = s * E(x), written here from the VAE alone (not through pipeline.protect.methods)."""
    return models.vae.encode(x01 * 2 - 1).latent_dist.mean * models.vae.config.scaling_factor


# --------------------------------------------------------------------------- files


def image_file(img, fmt: str, **params) -> bytes:
    """A PIL image (or a uint8 array) saved by Pillow in `fmt` with `params`, as bytes."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def png_16bit_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def tar_samples(data: bytes) -> dict[str, dict[str, bytes]]:
    """A WebDataset tar read independently of the pipeline: {key: {suffix: bytes}} (the key keeps its folder;
    the suffix is everything after the first dot of the file name)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            base = os.path.basename(member.name)
            key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
            out.setdefault(key, {})[base.split(".", 1)[1]] = tar.extractfile(member).read()
    return out


def table_rows(root: Path, name: str) -> list[dict]:
    """Every row of the Parquet table `name` a run wrote under root/tables/, in file order."""
    import pyarrow.parquet as pq

    return [r for f in sorted((root / "tables" / name).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


# --------------------------------------------------------------------------- protection and its checks


def step_inputs(models, batch: int, t=None, seed: int = 7, size: int = SMALL_SIZE, target=None,
                prompts=None) -> StepInputs:
    """One PGD step's draws for `batch` images of size x size: timesteps `t` (drawn uniformly from the
    seeded generator when None, before the noise), noise, the prompts' conditioning (the four prompts in
    turn unless given) and the model's added conditioning (SDXL, SD3, FLUX)."""
    gen = torch.Generator().manual_seed(seed)
    if t is None:
        t = torch.randint(0, models.scheduler.config.num_train_timesteps, (batch,), generator=gen)
    latent = size // models.vae_factor
    prompts = prompts or (list(PROMPTS) * batch)[:batch]
    return StepInputs(
        cond=models.encode_prompts(prompts),
        t=torch.as_tensor(t),
        noise=torch.randn(len(prompts), models.latent_channels, latent, latent, generator=gen),
        target_latent=target,
        added_cond=models.added_conditioning(prompts, size, size),
    )


def mean_objective(method, models, x01: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
    """The method's objective per image, averaged over the draws: inputs holds draws x batch rows."""
    draws = inputs.t.shape[0] // x01.shape[0]
    with torch.no_grad():
        return method.objective(models, x01.repeat(draws, 1, 1, 1), inputs).view(draws, x01.shape[0]).mean(0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 summation order: elementwise relative to the gradient's scale."""
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
    assert cosine(actual, expected) > 0.99999


def protect_photos(models, photos: list[np.ndarray], names=SMALL_PHOTOS, **config):
    """(protector, written uint8 images, results): `photos` as PNG files through `protect_encoded` (the unit every
    front end calls) with ProtectConfig(**config); every result must be written."""
    from pipeline.io.images import decode_image
    from pipeline.io.sample_data import png_bytes
    from pipeline.protect import ProtectConfig, build_protector
    from pipeline.protect.encoded import protect_encoded

    protector = build_protector(models, ProtectConfig(**config))
    results = protect_encoded(protector, [f"photos/{n}" for n in names], [png_bytes(p) for p in photos])
    for res in results:
        assert res.error is None, (res.key, res.error)
    return protector, [decode_image(r.data).rgb for r in results], results
