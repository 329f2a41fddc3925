"""The metric interface: every metric states its facts, identical images give the ideal value, a metric built
without real weights says it is uncalibrated, and building a random backbone leaves the caller's generator alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluate.report import GLOSSARY
from pipeline.metrics import METRICS, PAIR, PROMPT, PSNR_CAP, SET, STYLE, Linf, Metric
from pipeline.metrics.mimicry import MetricConfig, Metrics
from pipeline.metrics.style import StyleAccuracy, StyleDistance, StyleJudge

IDEAL = {"linf": 0.0, "psnr": PSNR_CAP, "ssim": 1.0, "lpips": 0.0, "clip_i2i": 100.0}  # of an image and itself


@pytest.fixture(scope="module")
def metrics():
    return Metrics(MetricConfig(device="cpu"))


@pytest.fixture(scope="module")
def every(metrics) -> list[Metric]:
    """One instance of every metric, random backbones."""
    style = metrics.style({"a": [np.zeros((16, 16, 3), np.uint8)], "b": [np.full((16, 16, 3), 200, np.uint8)]}, 16)
    return [Linf(), *metrics.paired, *metrics.sets, *style]


def test_every_metric_states_its_facts(every):
    assert sorted(type(m).__name__ for m in every) == sorted(cls.__name__ for cls in METRICS)  # all exist, once
    for m in every:
        assert isinstance(m.name, str) and m.name, m
        assert isinstance(m.higher_is_better, bool), m
        assert m.compares in (PAIR, SET, PROMPT, STYLE), m
        assert isinstance(m.calibrated, bool), m
    assert len({m.name for m in every}) == len(every)  # a name is one column value


def test_directions_agree_with_the_report(every):
    """The report's glossary says which way is 'further'; a metric's higher_is_better must say the same."""
    for m in every:
        entry = GLOSSARY.get(f"{m.name}_ref", GLOSSARY.get(m.name)) if m.compares == PAIR else GLOSSARY.get(m.name)
        if entry is not None:
            assert entry[1] == (-1 if m.higher_is_better else +1), m


def test_identical_images_give_the_ideal_value(every, photos):
    images = [photos["coffee"][:64, :96], photos["chelsea"][100:164, 100:164]]
    pair_metrics = [m for m in every if m.compares == PAIR]
    assert {m.name for m in pair_metrics} == set(IDEAL)
    for m in pair_metrics:
        assert m(images, [img.copy() for img in images]) == pytest.approx(IDEAL[m.name], abs=1e-3), m
    assert next(m for m in every if m.name == "lpips")(images, [img.copy() for img in images]) == 0.0  # exactly


def test_a_style_among_its_own_references_and_too_few_candidates():
    refs = {"dark": [np.full((16, 16, 3), v, np.uint8) for v in (10, 30)],
            "light": [np.full((16, 16, 3), v, np.uint8) for v in (200, 230)]}
    metrics = Metrics(MetricConfig(device="cpu"))
    accuracy, distance = metrics.style(refs, 16)
    assert accuracy(refs["dark"], "dark") == 1.0 and accuracy(refs["dark"], "light") == 0.0
    assert distance(refs["dark"], "dark") < distance(refs["dark"], "light")
    judge = StyleJudge(metrics.style_descriptor, {"dark": refs["dark"]}, 16)
    assert StyleAccuracy(judge)(refs["dark"], "dark") is None  # nothing to confuse it with
    assert StyleDistance(judge)(refs["dark"], "dark") is not None


def test_uncalibrated_metrics_say_so_and_weights_make_them_calibrated(every):
    backbone = {"lpips", "clip_i2i", "clip_i2i_ref", "clip_score", "kid", "fid", "style_accuracy", "style_distance"}
    assert {m.name for m in every if not m.calibrated} == backbone
    # the flag follows the weights a metric was built with; nothing is loaded to know it
    given = Metrics(MetricConfig(device="cpu", lpips_weights="alexnet.pth", clip_model="clip/", fid_weights="inc.pth",
                                 style_weights="vgg19.pth"))
    assert all(m.calibrated for m in (*given.paired, *given.sets)) and given.style_descriptor.calibrated
    assert all(given.calibrated.values())


def test_random_backbones_are_seeded_and_leave_the_global_generator_alone():
    from pipeline.metrics.clip import random_clip
    from pipeline.metrics.fid import SetFeatures
    from pipeline.metrics.lpips import build_lpips
    from pipeline.metrics.style import StyleDescriptor

    def build():
        return [build_lpips()[0], random_clip()[0], SetFeatures().extractor, StyleDescriptor().trunk]

    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = build()
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(6)  # another caller state: the same weights
    for a, b in zip(first, build()):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def ssim_float64(clean: np.ndarray, protected: np.ndarray) -> float:
    """SSIM as Wang et al. define it (Gaussian 11, sigma 1.5, reflect-padded), dense 11 x 11 window, in float64."""
    import torch.nn.functional as F

    from pipeline.io.images import to_batch

    x, y = (to_batch([img], "uint8").double() for img in (protected, clean))
    d = torch.arange(-5, 6, dtype=torch.float64)
    g = torch.exp(-(d / 1.5) ** 2 / 2)
    g = g / g.sum()
    window = (g[:, None] @ g[None, :]).expand(3, 1, -1, -1)
    x, y = (F.pad(t, (5, 5, 5, 5), mode="reflect") for t in (x, y))
    mx, my, xx, yy, xy = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), window, groups=3).split(1)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vx, vy, cov = (xx - mx**2).clamp(min=0), (yy - my**2).clamp(min=0), xy - mx * my
    return float((((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def test_psnr_and_ssim_are_torchmetrics_values_without_importing_it(photos):
    """visibility.py writes PSNR and SSIM out (Wang et al. 2004: Gaussian 11, sigma 1.5) so that measuring a
    written file does not import torchmetrics (4 s of every fresh Ray worker); they must stay its numbers."""
    import subprocess
    import sys

    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from pipeline.io.images import to_batch
    from pipeline.metrics.visibility import psnr, ssim

    rng = np.random.default_rng(0)
    for clean in (photos["coffee"][:120, :97], photos["astronaut"][:11, :40]):
        for eps in (2, 16):
            noisy = np.clip(clean.astype(int) + rng.integers(-eps, eps + 1, clean.shape), 0, 255).astype(np.uint8)
            a, b = (to_batch([img], "uint8") for img in (noisy, clean))
            expected = float(structural_similarity_index_measure(a.float(), b.float(), data_range=255.0))
            # float32 is about 1e-6 off the float64 value on these images (measured: torchmetrics' arithmetic up to
            # 2.1e-6, ours, separable, up to 1.3e-6): held to the definition in float64 and to torchmetrics
            assert ssim(clean, noisy) == pytest.approx(ssim_float64(clean, noisy), abs=2e-6)
            assert ssim(clean, noisy) == pytest.approx(expected, abs=3e-6)
            expected = float(peak_signal_noise_ratio(a.double(), b.double(), data_range=255.0))
            assert psnr(clean, noisy) == pytest.approx(expected, abs=1e-5)
    code = "import sys, pipeline.batch.stages, pipeline.protect.encoded; print('torchmetrics' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
