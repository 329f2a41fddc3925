"""Metric sanity: identical images, clearly different images, small-set KID/FID, calibration flags."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate.mimic.common import mimic_view
from pipeline.metrics.base import measure
from pipeline.metrics.mimicry import MetricConfig, Metrics
from pipeline.metrics.visibility import PSNR, PSNR_CAP


@pytest.fixture(scope="module")
def images(photos):
    return [mimic_view(p, 64) for p in photos.values()]


@pytest.fixture(scope="module")
def metrics():
    return Metrics(MetricConfig(device="cpu", fid_min_images=2))


def noisy(img: np.ndarray, amount: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(np.int32) + rng.integers(-amount, amount + 1, img.shape), 0, 255).astype(np.uint8)


def by_name(metrics) -> dict:
    return {m.name: m for m in metrics}


def test_identical_images_give_ssim_1_lpips_0_psnr_cap(metrics, images):
    got = {m.name: value for m, value in measure(metrics.paired, images, references=[img.copy() for img in images])}
    assert got["psnr"] == PSNR_CAP
    assert got["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert got["lpips"] == 0.0
    assert got["clip_i2i"] == pytest.approx(100.0, abs=1e-3)


def test_lpips_of_a_real_difference_is_positive_and_grows(metrics, images):
    # the backbone is random here, but LPIPS of a nearly identical image must still be smaller
    small = metrics.lpips(images, [noisy(i, 4) for i in images])
    large = metrics.lpips(images, [noisy(i, 64) for i in images])
    assert 0 < small < large
    assert PSNR()(images, [noisy(i, 64) for i in images]) < 25


def test_set_metrics_on_a_small_group(metrics, images):
    out = {m.name: value for m, value in measure(metrics.sets, [noisy(i, 32) for i in images], references=images,
                                                 prompts="a photo")}
    assert set(out) == {"kid", "fid", "clip_i2i_ref", "clip_score"}  # fid because fid_min_images=2 here
    assert all(np.isfinite(v) for v in out.values())
    assert 0 <= out["clip_score"] <= 100
    # below fid_min_images only KID is computed: FID of a handful of images is meaningless
    assert by_name(Metrics(MetricConfig(device="cpu")).sets)["fid"](images, images) is None


def test_random_backbones_are_marked_uncalibrated(metrics):
    flags = metrics.calibrated
    assert flags["psnr"] and flags["ssim"]
    assert not any(flags[m] for m in ("lpips", "clip_score", "clip_i2i", "fid", "kid"))


def test_lpips_loads_alexnet_weights_from_a_path(tmp_path, images):
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(7)
    state = {k: v.contiguous() for k, v in torchvision.models.alexnet().state_dict().items()}
    save_file(state, str(tmp_path / "alexnet.safetensors"))
    m = Metrics(MetricConfig(device="cpu", lpips_weights=str(tmp_path / "alexnet.safetensors")))
    assert m.calibrated["lpips"]
    assert torch.equal(m.lpips.net.net.slice1[0].weight, state["features.0.weight"])
    assert m.lpips(images[:1], images[:1]) == 0.0


def test_kid_of_identical_sets_is_near_zero_and_far_from_a_different_set(metrics, images):
    """KID compares the two sets it is given: identical sets sit near 0 (its unbiased estimate is not exactly 0)."""
    group = images + [img[:, ::-1].copy() for img in images]  # 6 images: a smaller estimator bias than 3
    kid = by_name(metrics.sets)["kid"]
    same = kid(group, [img.copy() for img in group])
    other = kid([255 - img for img in group], group)  # the random backbone's scale is small
    assert other > 0 and abs(same) < 0.2 * other, (same, other)
