"""Each purification on a real photo: shape, range, determinism with a seed, the parameter's direction."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.metrics.visibility import psnr
from pipeline.study.purify import PurifyContext, parse_purification, parse_purifications

# (name, weak, strong): the strong parameter must change the photo more than the weak one
CPU_CASES = [("jpeg", 90, 20), ("resize", 1.5, 4), ("noise", 0.02, 0.1), ("blur", 0.5, 2),
             ("quantize", 6, 2), ("tvm", 0.02, 0.2)]


@pytest.fixture(scope="module")
def photo(photos) -> np.ndarray:
    img = photos["astronaut"][:384, 64:448]
    return np.asarray(Image.fromarray(img).resize((64, 48), Image.BICUBIC))  # not square, not a multiple of 16


@pytest.fixture(scope="module")
def context() -> PurifyContext:
    return PurifyContext(model="tiny", device="cpu", dtype="fp32", upscaler_steps=4, diffpure_steps=10,
                         gridpure_iterations=5)


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def run(spec: str, photo: np.ndarray, seed: int = 0, key: str = "k", context=None) -> np.ndarray:
    (out,) = parse_purification(spec).apply([photo], [key], seed=seed, context=context)
    assert out.shape == photo.shape and out.dtype == np.uint8
    return out


def test_specs_parse_and_refuse():
    assert parse_purification("jpeg:75").spec == "jpeg:75"
    assert parse_purification("jpeg").spec == "jpeg:75"  # the default parameter
    assert parse_purification(" NOISE:0.05 ").spec == "noise:0.05"
    assert [u.spec for u in parse_purifications("none,blur:2")] == ["none", "blur:2"]
    for bad, reason in [("sharpen:1", "unknown purification"), ("jpeg:x", "not a number"), ("none:3", "no parameter"),
                        ("jpeg:0", "quality"), ("quantize:2.5", "whole number"), ("diffpure:1.5", r"\(0, 1\]"),
                        ("resize:0.5", ">= 1"), ("jpeg:75,jpeg:75", "twice"), ("jpeg:75:x", "no option"),
                        ("gridpure:0", r"\(0, 1\]")]:
        with pytest.raises(ValueError, match=reason):
            parse_purifications(bad)


def test_none_is_the_identity(photo):
    assert np.array_equal(run("none", photo), photo)


@pytest.mark.parametrize("name,weak,strong", CPU_CASES)
def test_cpu_purification(photo, name, weak, strong):
    a = run(f"{name}:{weak}", photo)
    b = run(f"{name}:{strong}", photo)
    assert np.array_equal(a, run(f"{name}:{weak}", photo))  # deterministic for a seed and key
    assert 0 < mse(a, photo) < mse(b, photo)  # changes the photo, more at the stronger setting


def test_noise_is_seeded_per_image(photo):
    same = run("noise:0.05", photo, seed=1, key="a")
    assert np.array_equal(same, run("noise:0.05", photo, seed=1, key="a"))
    assert not np.array_equal(same, run("noise:0.05", photo, seed=2, key="a"))
    assert not np.array_equal(same, run("noise:0.05", photo, seed=1, key="b"))
    assert abs(np.std(same.astype(float) - photo) / 255 - 0.05) < 0.01  # sigma in [0, 1] units


def test_diffpure_denoises_more_with_larger_t(photo, context):
    near = run("diffpure:0.02", photo, context=context)
    assert np.array_equal(near, run("diffpure:0.02", photo, context=context))
    # the further the latent is noised, the more the result depends on the noise (seed), the less on the image
    def spread(t):
        return mse(run(f"diffpure:{t}", photo, seed=1, context=context), run(f"diffpure:{t}", photo, seed=2, context=context))

    assert spread(0.02) < spread(0.6)


def test_impress_moves_further_with_more_steps(photo, context):
    few = run("impress:2", photo, context=context)
    assert np.array_equal(few, run("impress:2", photo, context=context))
    assert np.array_equal(run("impress:0", photo, context=context), photo)
    assert 0 < mse(few, photo) < mse(run("impress:20", photo, context=context), photo)


def test_noisy_upscale_runs_the_x4_upscaler(photo, context):
    from pipeline.study.purify.noisy_upscale import upscaler

    pipe = upscaler(context)
    assert type(pipe).__name__ == "StableDiffusionUpscalePipeline"
    out = run("noisy_upscale:0.1", photo, context=context)
    assert np.array_equal(out, run("noisy_upscale:0.1", photo, context=context))
    assert not np.array_equal(out, run("noisy_upscale:0.1", photo, seed=3, context=context))  # the noise is seeded


def test_gridpure_grids_are_the_papers():
    from pipeline.study.purify.gridpure import grid_boxes, grid_purify

    boxes, gh, gw = grid_boxes(512, 512, 256)  # SD's 512 px: 3 x 3 half-overlapping grids of 256 (stride 128)
    assert (gh, gw) == (256, 256) and sorted({y for y, _ in boxes}) == [0, 128, 256] and len(boxes) == 9
    boxes, _, _ = grid_boxes(48, 80, 32)  # the last row and column flush with the border
    assert sorted({y for y, _ in boxes}) == [0, 16] and sorted({x for _, x in boxes}) == [0, 16, 32, 48]
    x = np.random.default_rng(0).random((48, 80, 4)).astype(np.float32)
    seen = []
    merged = grid_purify(x, 32, lambda tiles: seen.append(len(tiles)) or tiles)  # identity purifier
    assert seen == [len(boxes) + 1]  # every grid and the square of the four corners, in one batch
    assert np.allclose(merged, x, atol=1e-6)  # averaging overlapping copies of the same values changes nothing
    doubled = grid_purify(x, 32, lambda tiles: [2 * t for t in tiles])
    assert np.allclose(doubled, 2 * x, atol=1e-5)  # every pixel covered, each weighted equally


def test_gridpure_depends_more_on_the_noise_with_larger_t(photo, context):
    near = run("gridpure:0.01", photo, context=context)
    assert np.array_equal(near, run("gridpure:0.01", photo, context=context))
    assert 0 < mse(near, photo)

    def spread(t):
        return mse(run(f"gridpure:{t}", photo, seed=1, context=context), run(f"gridpure:{t}", photo, seed=2, context=context))

    assert spread(0.01) < spread(0.2)


@pytest.fixture(scope="module")
def held_out_photo() -> np.ndarray:
    """The centre of a photo neither the tiny models nor the pixel DDPM trained on (rocket), 64 x 64."""
    from pipeline.data.photos import held_out_images

    return np.round(held_out_images(64, crops_per_photo=1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def test_pdmpure_denoises_a_noised_held_out_photo(held_out_photo, context):
    noisy = run("noise:0.08", held_out_photo)
    purified = run("pdmpure:0.1", noisy, context=context)
    assert np.array_equal(purified, run("pdmpure:0.1", noisy, context=context))  # deterministic for a seed and key
    assert psnr(purified, held_out_photo) > psnr(noisy, held_out_photo) + 3  # the pixel DDPM removes noise


def test_pdmpure_depends_more_on_the_noise_with_larger_t(photo, context):
    def spread(t):
        return mse(run(f"pdmpure:{t}", photo, seed=1, context=context), run(f"pdmpure:{t}", photo, seed=2, context=context))

    assert 0 < spread(0.05) < spread(0.5)
    assert mse(run("pdmpure:0.05", photo, context=context), photo) < mse(run("pdmpure:0.5", photo, context=context), photo)


def test_pdmpure_takes_a_users_pixel_model_directory(tmp_path, photo, context):
    from pipeline.models.builtin.pixel import builtin_pixel_path, load_trained_unet
    from pipeline.study.purify.pdmpure import load_pixel_model

    unet, scheduler = load_pixel_model(builtin_pixel_path(), "cpu", "fp32")  # the built-in, through from_pretrained
    assert type(unet).__name__ == "UNet2DModel" and scheduler.config.num_train_timesteps == 1000
    load_trained_unet().save_pretrained(tmp_path / "unet-only")  # a bare UNet2DModel directory: DDPM's schedule
    mine = PurifyContext(model="tiny", device="cpu", dtype="fp32", diffpure_steps=context.diffpure_steps,
                         pixel_model=str(tmp_path / "unet-only"))
    assert np.array_equal(run("pdmpure:0.1", photo, context=mine), run("pdmpure:0.1", photo, context=context))
    named = PurifyContext(model="tiny", device="cpu", dtype="fp32", diffpure_steps=context.diffpure_steps,
                          pixel_model="tiny-pixel")  # the built-in by its name
    assert np.array_equal(run("pdmpure:0.1", photo, context=named), run("pdmpure:0.1", photo, context=context))
    from diffusers import UNet2DModel

    UNet2DModel(in_channels=4, out_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(tmp_path / "latent")
    with pytest.raises(ValueError, match="pixel-space"):
        load_pixel_model(str(tmp_path / "latent"))  # a latent-space UNet is refused


def test_tiny_pixel_weights_are_small_and_checked(monkeypatch):
    from pipeline.models.builtin import pixel

    path = pixel.WEIGHTS_DIR / pixel.WEIGHTS_NAME
    assert path.stat().st_size < 3 * 2**20 and pixel.sha256(path) == pixel.WEIGHTS_SHA256
    monkeypatch.setattr(pixel, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        pixel.load_trained_unet()
