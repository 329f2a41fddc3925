"""Style mimicry on the built-in ``tiny-style`` model: textual inversion and LoRA learn a held-out artist,
and a gradient protection keeps the textual-inversion mimic further from the artist than noise does.

Margins are half of what was measured on these artists and seeds (held-out styles 4-7, images seeded
500 + artist); the benchmark that reports the figures (benchmarks/bench_style_mimicry.py) uses held-out
styles 0-3 and other seeds.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from pipeline.data.styles import HELD_OUT_STYLES, artist_images
from pipeline.evaluate.mimic import Lora, LoraConfig, TextualInversion, TextualInversionConfig
from pipeline.metrics.style import StyleDescriptor, StyleJudge, reference_styles

pytestmark = pytest.mark.slow
ARTISTS = HELD_OUT_STYLES[4:]  # not the benchmark's


@pytest.fixture(scope="module")
def judge():
    return StyleJudge(StyleDescriptor(), reference_styles("builtin"), 64)


def scores(judge, mimic, images, artist) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out, _ = mimic.run(images, artist, "clean", tmp)
    s = judge.score(out.images, artist)
    return float(np.mean(s["style_match"])), float(np.mean(s["style_distance"]))


def test_textual_inversion_and_lora_learn_a_held_out_artist(judge):
    """Measured (4 images, 4 generated, chance 1/8): TI 30 steps 0.69 against 0.00 untrained;
    LoRA 60 steps 0.56 (UNet + text-encoder adapters, caption dropout; UNet-only without dropout: 0.31)."""
    ti = TextualInversion("tiny-style", TextualInversionConfig(steps=30, num_images=4), device="cpu")
    untrained = TextualInversion("tiny-style", TextualInversionConfig(steps=0, num_images=4), device="cpu")
    lora = Lora("tiny-style", LoraConfig(steps=60, learning_rate=3e-3, num_images=4), device="cpu")
    learned, before, lora_acc = [], [], []
    for i, style in enumerate(ARTISTS):
        images = artist_images(style, 4, 64, seed=504 + i)
        learned.append(scores(judge, ti, images, style.name)[0])
        before.append(scores(judge, untrained, images, style.name)[0])
        lora_acc.append(scores(judge, lora, images, style.name)[0])
    assert np.mean(learned) >= 0.35 and np.mean(learned) >= np.mean(before) + 0.3
    assert np.mean(lora_acc) >= 0.34  # chance 0.125 + half the measured margin


def test_sds_minus_keeps_the_textual_inversion_mimic_further_from_the_artist_than_noise(judge):
    """SDS(-) at eps 16 against uniform noise of the same budget (8 images, 60 TI steps). Measured: style
    distance 4.45 clean, 4.46 noise, 4.84 SDS(-), 4.41 SDS(+) (the sign-flipped method fails this test);
    style accuracy 0.94 for all three here (these artists' palettes survive; on the benchmark's artists
    SDS(-) takes it from 0.88 to 0.41)."""
    from pipeline.models.loading import load_models
    from pipeline.protect import ProtectConfig, build_protector
    from pipeline.protect.baseline import apply_deltas, uniform_noise

    models = load_models("tiny-style", device="cpu", dtype="fp32")
    ti = TextualInversion("tiny-style", TextualInversionConfig(steps=60, num_images=8), device="cpu")
    protector = build_protector(models, ProtectConfig(method="sds-", eps=16, steps=16, step_size=2, seed=0))
    acc, dist = {}, {}
    for i, style in enumerate(ARTISTS):
        images = artist_images(style, 8, 64, seed=504 + i)
        keys = [f"{4 + i}/{j}" for j in range(len(images))]  # the measured run's keys (per-key seeds)
        for name, x in (("noise", apply_deltas(images, uniform_noise(images, 16, 0))),
                        ("sds-", apply_deltas(images, protector.protect(images, keys)))):
            a, d = scores(judge, ti, x, style.name)
            acc.setdefault(name, []).append(a)
            dist.setdefault(name, []).append(d)
    assert np.mean(dist["sds-"]) - np.mean(dist["noise"]) >= 0.19
    assert np.mean(acc["sds-"]) <= np.mean(acc["noise"])
