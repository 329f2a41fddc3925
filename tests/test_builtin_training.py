"""The trained built-in `tiny`: its shipped weights, the script that made them, what it has learned.

Figures are measured on photos held out of training (data.photos.HELD_OUT), at 64 px.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import photos
from pipeline.models.builtin import build as bm
from pipeline.train import tiny as bt

# measured on the shipped weights (v4): 22.07 dB, SSIM 0.586 on these 10 held-out images (23.77 dB, 0.642 on
# benchmarks/results/builtin_tiny.json's 18); v3 scored 18.49 dB here, a random VAE about 10 dB
MIN_VAE_PSNR = 21.0
MIN_VAE_SSIM = 0.53


def test_held_out_photos_are_not_trained_on():
    assert not set(photos.HELD_OUT) & set(photos.TRAIN_PHOTOS)
    # the photos the other tests use (tests/conftest.py) are training photos, not evaluation ones
    assert {"astronaut", "coffee", "chelsea"} <= set(photos.TRAIN_PHOTOS)
    for name in photos.TRAIN_PHOTOS + photos.HELD_OUT:  # bundled with scikit-image: no download
        img = photos.load_photo(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 64


def test_recoloured_crops_colour_grayscale_photos_and_permute_colour_ones():
    for crop in photos.PhotoCrops(["camera"], seed=3, colour=True).sample(6, 32)[0]:
        assert 0 <= float(crop.min()) and float(crop.max()) <= 1
        assert not (torch.equal(crop[0], crop[1]) and torch.equal(crop[1], crop[2]))  # no longer gray
        # a + (b - a) * gray: every channel is an affine map of the same gray values
        varying = [c.flatten() for c in crop if float(c.std()) > 1e-4]
        for c in varying[1:]:
            assert float(torch.corrcoef(torch.stack([varying[0], c]))[0, 1].abs()) > 0.999
    # a colour photo keeps its channels, in some order (the first crop is drawn alike with and without)
    plain = photos.PhotoCrops(["coffee"], seed=3).sample(1, 32)[0][0]
    recoloured = photos.PhotoCrops(["coffee"], seed=3, colour=True).sample(1, 32)[0][0]
    assert sorted(float(c.sum()) for c in plain) == pytest.approx(sorted(float(c.sum()) for c in recoloured))


def test_shipped_weights_match_their_recorded_sha256():
    path = bm.WEIGHTS_DIR / bm.WEIGHTS_NAME
    assert path.stat().st_size < 16 * 2**20  # a few MB inside the package
    assert bm.sha256(path) == bm.WEIGHTS_SHA256


def test_coverage_weights_match_their_sha256_and_the_script_that_made_them_writes_what_loads(tmp_path, monkeypatch):
    """tiny-v / tiny-xl(-inpaint) ship their UNets (pipeline/train/coverage.py); a 2-step run of the script writes a
    file that loads into each (strict: every tensor present, none left over), and a replaced file is refused."""
    from pipeline.train import coverage

    path = bm.WEIGHTS_DIR / bm.COVERAGE_WEIGHTS_NAME
    assert path.stat().st_size < 8 * 2**20 and bm.sha256(path) == bm.COVERAGE_WEIGHTS_SHA256
    assert coverage.main(["--out", str(tmp_path), "--steps", "2"]) == 0
    for name in bm.COVERAGE_UNETS:
        pipe = bm.build_pipeline(name)
        bm.load_coverage_weights(pipe, name, tmp_path / bm.COVERAGE_WEIGHTS_NAME)
        assert pipe.vae.config.scaling_factor > 0
    monkeypatch.setattr(bm, "COVERAGE_WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        bm._build_pipeline("tiny-xl")


def test_a_replaced_weights_file_is_refused(monkeypatch):
    monkeypatch.setattr(bm, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        bm._build_pipeline("tiny")


def test_tiny_and_tiny_inpaint_share_the_trained_vae_and_text_encoder(tiny_models):
    from pipeline.models.loading import load_models

    inpaint = load_models("tiny-inpaint", device="cpu", dtype="fp32")
    for a, b in ((tiny_models.vae, inpaint.vae), (tiny_models.text_encoder, inpaint.text_encoder)):
        for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(p, q), name
    assert inpaint.unet.config.in_channels == 9 and tiny_models.unet.config.in_channels == 4
    assert tiny_models.latent_scale == inpaint.latent_scale != 0.18215  # calibrated, not SD's constant


def test_vae_reconstructs_held_out_photos(tiny_models):
    """PSNR of E -> D on held-out photos at 64 px (a random VAE scores about 10 dB)."""
    figures = bt.evaluate_vae(tiny_models.vae, photos.held_out_images(64, crops_per_photo=4))
    assert figures["psnr"] > MIN_VAE_PSNR and figures["ssim"] > MIN_VAE_SSIM


def test_latent_scale_gives_unit_variance_latents(tiny_models):
    from pipeline.protect.methods import encode

    z = encode(tiny_models, photos.held_out_images(64, crops_per_photo=8))
    assert 0.6 < float(z.std()) < 1.6


def test_unet_denoises_better_than_predicting_zero(tiny_models):
    """|| eps_theta(z_t, t, c) - eps ||^2 on held-out latents is well under E||eps||^2 = 1."""
    from pipeline.protect.methods import encode

    gen = torch.Generator().manual_seed(0)
    z = encode(tiny_models, photos.held_out_images(64, crops_per_photo=8))
    noise = torch.randn(z.shape, generator=gen)
    t = torch.randint(50, 600, (len(z),), generator=gen)
    z_t = tiny_models.scheduler.add_noise(z, noise, t)
    cond = tiny_models.encode_prompts(["a photo"] * len(z))
    with torch.no_grad():
        err = (tiny_models.unet(z_t, t, encoder_hidden_states=cond).sample - noise).pow(2).mean()
    assert float(err) < 0.5


def test_unet_is_conditioned_on_the_prompt(tiny_models):
    from pipeline.protect.methods import encode

    gen = torch.Generator().manual_seed(1)
    z = encode(tiny_models, photos.held_out_images(64, crops_per_photo=1))
    t = torch.full((len(z),), 700)
    z_t = tiny_models.scheduler.add_noise(z, torch.randn(z.shape, generator=gen), t)
    with torch.no_grad():
        a, b = (tiny_models.unet(z_t, t, encoder_hidden_states=tiny_models.encode_prompts([p] * len(z))).sample
                for p in ("a photo of coins", "a photo of hubble_deep_field"))
    assert float((a - b).abs().mean()) > 0.01


@pytest.mark.slow
def test_training_script_runs_and_its_weights_load(tmp_path):
    """A few steps of every stage of the script that made the shipped weights; they load back."""
    from safetensors import safe_open

    small = dict(batch=2, warmup=1)
    path = bt.train_builtin(tmp_path, bt.VAETraining(steps=2, crop=32, eval_every=2, colour=True, **small),
                            bt.UNetTraining(steps=2, log_every=1, **small), bt.UNetTraining(steps=2, log_every=1, **small),
                            pool_size=4, calibration_crops=8)
    stages = [line.split('"stage": "')[1].split('"')[0] for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert stages.count("vae") == 1 and stages.count("unet") == 2 and stages.count("unet-inpaint") == 2
    assert stages[-1] == "done"
    with safe_open(str(path), framework="pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"vae", "text_encoder", "unet"}
        assert float(f.metadata()["scaling_factor"]) > 0
    from diffusers import StableDiffusionPipeline

    for name in ("tiny", "tiny-inpaint"):
        parts = bm.random_parts(name)
        pipe = StableDiffusionPipeline(**parts, scheduler=bm.scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        bm.load_trained_weights(pipe, name, path)  # strict: every tensor present, none left over
    # a second VAE phase starts from a packed weights file (as v4's did from v3's) and stops after the VAE
    ckpt = bt.train_builtin(tmp_path / "phase2", bt.VAETraining(steps=1, crop=32, eval_every=1, colour=True, **small),
                            bt.UNetTraining(steps=0), bt.UNetTraining(steps=0), vae_init=path, vae_only=True)
    from safetensors.torch import load_file

    trained, packed = load_file(ckpt), load_file(path)
    assert set(trained) == {k[len("vae."):] for k in packed if k.startswith("vae.")}
    assert any(not torch.equal(v, packed[f"vae.{k}"].float()) for k, v in trained.items())  # it trained on from there


def test_tiny_style_weights_load_through_from_pretrained_and_paint_named_styles():
    """tiny-style's shipped file (sha256 checked) loads as a diffusers directory; a prompt for a training
    style paints that style more often than chance (1/24) says: measured 0.59 over all 24 at 4 images each
    (benchmarks/results/builtin_tiny_style_curve.jsonl); here 6 styles, 2 images each (measured 1.0)."""
    import numpy as np
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pipeline.data import styles as S
    from pipeline.metrics.style import StyleDescriptor, StyleJudge
    from pipeline.models.loading import model_path

    weights = bm.WEIGHTS_DIR / bm.STYLE_WEIGHTS_NAME
    assert bm.sha256(weights) == bm.STYLE_WEIGHTS_SHA256 and weights.stat().st_size < 16 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(model_path("tiny-style"), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.block_out_channels == [48, 96]
    judge = StyleJudge(StyleDescriptor(), {s.name: S.artist_images(s, 6, seed=31, photos=S.JUDGE_PHOTOS)
                                           for s in S.TRAIN_STYLES}, 64)
    hits = []
    for i, style in enumerate(S.TRAIN_STYLES[::4]):
        out = pipe([style.caption] * 2, num_inference_steps=20, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(i)).images
        hits += judge.score([np.round(x * 255).astype(np.uint8) for x in out], style.name)["style_match"]
    assert np.mean(hits) >= 0.5  # measured 1.0 on these 6 styles and seeds
