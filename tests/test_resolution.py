"""`--resolution auto` (issue 27): protection at the mimic's resolution, optimised through the downscale.

The working size follows the model's training area with the aspect kept; the perturbation lives at full
size, each PGD direction is pulled back through the differentiable resize (checked against finite
differences), and the budget holds exactly on the written file.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from pipeline.io.images import decode_image
from pipeline.io.sample_data import png_bytes
from pipeline.metrics.visibility import linf
from pipeline.protect import ProtectConfig, build_protector
from pipeline.protect.encoded import protect_encoded
from pipeline.protect.engine import pull_back, seen_by_models, working_mode, working_size


def photo(width: int, height: int) -> np.ndarray:
    """A real photo (chelsea, 451 x 300) cropped to the aspect and resized to width x height."""
    img = Image.fromarray(data.chelsea())
    w, h = img.size
    if w / h > width / height:
        crop = round(h * width / height)
        img = img.crop(((w - crop) // 2, 0, (w - crop) // 2 + crop, h))
    else:
        crop = round(w * height / width)
        img = img.crop((0, (h - crop) // 2, w, (h - crop) // 2 + crop))
    return np.asarray(img.resize((width, height), Image.Resampling.LANCZOS).convert("RGB"))


@pytest.mark.mutation
@pytest.mark.parametrize("size", [(2000, 3000), (3000, 2000), (1080, 1920), (4096, 4096), (700, 900)])
@pytest.mark.parametrize("side,multiple", [(512, 64), (768, 64), (1024, 64), (64, 16)])
def test_auto_keeps_the_aspect_and_the_training_area(size, side, multiple):
    h, w = size
    wh, ww = working_size(h, w, "auto", multiple, side)
    if h * w <= side**2:  # within the training area: the image's own size, as native
        assert (wh, ww) == working_size(h, w, "native", multiple) and working_mode(h, w, (wh, ww), "auto") == "pad"
        return
    assert wh % multiple == 0 and ww % multiple == 0
    assert wh <= h and ww <= w
    assert abs(wh / ww - h / w) <= (multiple / min(wh, ww)) * (h / w) + 1e-9  # one rounding step at most
    assert 0.7 * side**2 <= wh * ww <= 1.35 * side**2
    assert working_mode(h, w, (wh, ww), "auto") == "through"


@pytest.mark.mutation
def test_auto_within_the_training_area_is_native():
    assert working_size(300, 451, "auto", 64, 512) == working_size(300, 451, "native", 64) == (320, 512)
    assert working_mode(300, 451, (320, 512), "auto") == "pad"
    assert working_size(2000, 3000, "native", 64) == (2048, 3008)
    assert working_size(2000, 3000, "512", 64) == (512, 512)
    with pytest.raises(ValueError, match="resolution must be 'auto', 'native' or a positive integer"):
        ProtectConfig(resolution="big")
    assert ProtectConfig().resolution == "auto"


def test_the_direction_through_the_resize_is_the_gradient_of_the_loss_at_full_size(tiny_models):
    """<J_R^T d, v> against (f(R(x + h v)) - f(R(x - h v))) / 2h for photoguard's loss, in float64."""
    from pipeline.protect.methods import encode

    torch.manual_seed(0)
    x = torch.from_numpy(photo(90, 60).copy()).permute(2, 0, 1)[None].double() / 255
    models = dataclasses.replace(tiny_models, dtype=torch.float64, _prompt_cache={})  # the same VAE, in float64
    working = (32, 48)
    target = torch.randn(1, tiny_models.latent_channels, 4, 6)
    vae = tiny_models.vae
    vae.double()
    try:
        target = target.double()

        def objective(x01):  # L_tex = ||E(x) - target||^2 (methods.textural_loss, kept in float64 here)
            return (encode(models, x01) - target).pow(2).sum()

        def loss(x_full):
            return objective(seen_by_models(x_full, working))

        x_full = x.clone().requires_grad_(True)
        x_seen = seen_by_models(x_full, working)
        d_seen = torch.autograd.grad(objective(x_seen), x_seen, retain_graph=True)[0]
        g = pull_back(d_seen, x_seen, x_full)
        assert g.shape == x.shape and g.abs().sum() > 0
        for seed in range(3):
            v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            h = 1e-5
            with torch.no_grad():
                fd = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
            assert float((g * v).sum()) == pytest.approx(float(fd), rel=1e-4, abs=1e-8)
    finally:
        vae.float()


@pytest.mark.parametrize("width,height", [(240, 160), (256, 144), (144, 256)])  # 3:2, 16:9, 9:16
@pytest.mark.parametrize("method", ["sds-", "photoguard"])
def test_auto_keeps_size_aspect_and_the_exact_budget_on_the_written_file(width, height, method, tiny_models):
    image = photo(width, height)
    protector = build_protector(tiny_models, ProtectConfig(method=method, eps=8, steps=3, step_size=2))
    size = protector.working_size(height, width)
    assert size[0] * size[1] < height * width  # tiny's training area is 64 x 64: protection works through R
    (delta,) = protector.protect([image], keys=["poster"])
    assert delta.shape == (height, width, 3) and np.abs(delta).max() <= 8
    # the perturbation is full-resolution detail, not an upsampled working-size pattern
    assert np.abs(delta).max() > 4
    (res,) = protect_encoded(protector, ["poster"], [png_bytes(image)])
    assert res.error is None
    out = decode_image(res.data).rgb
    assert out.shape == image.shape
    assert 0 < linf(out, image) <= 8
    assert res.metrics["resolution"] == "auto" if "resolution" in res.metrics else True


def test_auto_protects_what_the_mimic_sees(tiny_models):
    """Through the resize, the mimic's downscaled input moves more in latent space than with a square copy
    mapped back (the perturbation optimised at another geometry than the mimic's)."""
    from pipeline.io.images import resize_pixels, to_tensor
    from pipeline.protect.methods import encode

    image = photo(288, 192)
    working = build_protector(tiny_models, ProtectConfig()).working_size(192, 288)

    def latent_shift(resolution: str) -> float:
        protector = build_protector(tiny_models, ProtectConfig(method="photoguard", eps=8, steps=10, step_size=1,
                                                               resolution=resolution))
        (delta,) = protector.protect([image], keys=["k"])
        x = to_tensor(image)
        x_adv = (x + torch.from_numpy(np.round(delta)).permute(2, 0, 1)[None] / 255).clamp(0, 1)
        with torch.no_grad():  # the mimic: resize to the working size, encode
            z0, z1 = (encode(tiny_models, resize_pixels(v, working)) for v in (x, x_adv))
        target = protector.target_latent(working)
        return float((z0 - target).pow(2).mean() - (z1 - target).pow(2).mean())  # how far toward the target

    assert latent_shift("auto") > latent_shift(str(math.isqrt(working[0] * working[1])))


# ---------------------------------------------------------------- cost known before paying it


def test_an_image_that_cannot_fit_the_memory_limit_is_an_error_row_naming_resolution(ray_local, tmp_path, capsys):
    import pyarrow.parquet as pq

    from pipeline.cli import main

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo(768, 512)).save(src / "poster.png")
    Image.fromarray(photo(48, 32)).save(src / "small.png")
    code = main(["protect", str(src), str(tmp_path / "out"), "--model", "tiny", "--steps", "1", "--no-progress",
                 "--resolution", "native", "--max-memory", "0.05"])
    assert code == 0, capsys.readouterr().err
    errors = pq.read_table(tmp_path / "out" / "tables" / "errors").to_pylist()
    assert [e["key"] for e in errors] == ["poster"]
    assert "working size 512x768 (--resolution native) needs about" in errors[0]["reason"]
    assert "use --resolution auto" in errors[0]["reason"]
    assert (tmp_path / "out" / "small.png").exists() and not (tmp_path / "out" / "poster.png").exists()
    # at auto the same poster fits the same limit (tiny works at about 64 x 64 through the resize): the gate the
    # actor consults (stages.ProtectActor) lets it through
    from pipeline.models.loading import load_models
    from pipeline.protect.cost import MemoryGate

    models = load_models("tiny", device="cpu", dtype="fp32")
    for resolution, refused in (("native", True), ("auto", False)):
        gate = MemoryGate(build_protector(models, ProtectConfig(method="sds-", steps=1, resolution=resolution)), 0.05)
        assert (gate.refusal(512, 768) is not None) is refused, resolution  # (height, width)


def test_a_long_run_is_announced_with_the_option_that_cuts_it(tmp_path, monkeypatch):
    from pipeline.batch import estimate as estimate_module
    from pipeline.batch.commit import plan_units
    from pipeline.batch.settings import RunSettings
    from pipeline.models.loading import ModelSpec

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo(600, 400)).save(src / "big.png")
    Image.fromarray(photo(60, 40)).save(src / "small.png")
    settings = RunSettings(input=str(src), output=str(tmp_path / "out"), model=ModelSpec("tiny", device="cpu"),
                           config=ProtectConfig(resolution="native", steps=50))
    units = plan_units("folder", [str(src / "big.png"), str(src / "small.png")], str(src), str(tmp_path / "out"))
    assert estimate_module.largest_pending_image(settings, "folder", units) == (400, 600)
    monkeypatch.setattr(estimate_module, "LONG_SECONDS", 0.0)
    line = estimate_module.cost_warning(settings, "folder", units)
    assert line.startswith("mimicshield: warning: the largest image (600x400, working at 608x400") or \
        line.startswith("mimicshield: warning: the largest image (600x400, working at 608x400"), line
    assert "--resolution auto" in line and "50 steps" in line
    monkeypatch.setattr(estimate_module, "LONG_SECONDS", 1e9)
    assert estimate_module.cost_warning(settings, "folder", units) is None
    settings.address = "10.0.0.5:6379"  # a cluster's workers are not this machine: no estimate
    monkeypatch.setattr(estimate_module, "LONG_SECONDS", 0.0)
    assert estimate_module.cost_warning(settings, "folder", units) is None


# ---------------------------------------------------------------- the evaluation's mimics see what fine-tuning scripts see


@pytest.mark.mutation
def test_mimics_and_their_references_crop_the_centre_and_keep_the_aspect():
    from pipeline.evaluate.mimic.common import mimic_view, to_model_tensor
    from pipeline.io.images import center_crop_resize
    from pipeline.metrics.base import same_size

    wide = np.zeros((60, 180, 3), np.uint8)  # thirds: red | green | blue
    wide[:, :60, 0] = wide[:, 60:120, 1] = wide[:, 120:, 2] = 255
    view = mimic_view(wide, 30)
    assert view.shape == (30, 30, 3)
    assert (view[:, :, 1] > 200).all() and view[:, :, 0].max() < 60 and view[:, :, 2].max() < 60  # the centre, unsquashed
    tall = wide.transpose(1, 0, 2).copy()
    assert (mimic_view(tall, 30)[:, :, 1] > 200).all()
    x = to_model_tensor([wide], 30)
    assert tuple(x.shape) == (1, 3, 30, 30) and float(x[0, 1].min()) > 0.5
    # a square image is only resized
    square = np.asarray(Image.fromarray(wide[:, 60:120]).resize((64, 64)))
    assert np.array_equal(center_crop_resize(square, 64), square)
    # the metric compares a mimic output with the reference as the mimic saw it
    _, (ref,) = same_size([view], [wide])
    assert np.array_equal(ref, view)
    # a mask is cropped like its image (nearest: still binary)
    mask = np.zeros((60, 180), np.uint8)
    mask[:, 80:100] = 255
    cropped = center_crop_resize(mask, 30, Image.NEAREST)
    assert set(np.unique(cropped)) <= {0, 255} and cropped[:, 15].min() == 255 and cropped[:, 0].max() == 0
