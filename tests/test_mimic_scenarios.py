"""SDEdit and inpainting mimics on the built-in tiny models, and inpainting masks."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate.mimic import Inpaint, InpaintConfig, SDEdit, SDEditConfig
from pipeline.evaluate.mimic.common import mimic_view
from pipeline.evaluate.mimic.masks import (
    center_mask,
    make_mask,
    mask_from_meta,
    random_mask,
)
from pipeline.models.loading import model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(photos):
    """Two clean 64x64 photos and a protected-like copy (an eps=8 perturbation)."""
    clean = [mimic_view(photos[k], 64) for k in ("astronaut", "coffee")]
    rng = np.random.default_rng(0)
    protected = [np.clip(c.astype(int) + rng.choice([-8, 8], c.shape), 0, 255).astype(np.uint8) for c in clean]
    return ["a", "b"], clean, protected


def test_sdedit_one_step_and_ddim(pair):
    keys, clean, protected = pair
    sd = SDEdit(model_path("tiny"), SDEditConfig(strengths=(0.2, 0.5), ddim_steps=4), device="cpu")
    outs = sd.run(clean, keys, "clean")
    assert [o.setting for o in outs] == ["one_step/s=0.2", "one_step/s=0.5", "ddim4/s=0.2", "ddim4/s=0.5"]
    for o in outs:
        assert o.keys == keys and o.source == "clean"
        assert [i.shape for i in o.images] == [(64, 64, 3)] * 2 and all(i.dtype == np.uint8 for i in o.images)
    # fixed seeds: the same inputs give the same edits; other inputs give other edits
    again = sd.run(clean, keys, "clean")
    assert all(np.array_equal(a, b) for o, p in zip(outs, again) for a, b in zip(o.images, p.images))
    prot = sd.run(protected, keys, "protected")
    assert any(not np.array_equal(a, b) for o, p in zip(outs, prot) for a, b in zip(o.images, p.images))


def test_inpaint_keeps_outside_of_mask_and_uses_meta_masks(pair):
    keys, clean, _ = pair
    ip = Inpaint(model_path("tiny-inpaint"), InpaintConfig(steps=3), device="cpu")
    metas = [{"mask": [0.0, 0.0, 0.5, 0.5]}, None]  # only the first sample has a mask of its own
    outs = {o.setting: o for o in ip.run(clean, keys, "clean", metas=metas)}
    assert set(outs) == {"meta", "center", "random"}
    assert outs["meta"].keys == ["a"] and outs["center"].keys == keys
    img = outs["center"].images[0]
    mask = center_mask(64, 64) > 0
    inside = np.abs(img.astype(int) - clean[0]).mean(axis=2)[mask].mean()
    outside = np.abs(img.astype(int) - clean[0]).mean(axis=2)[~mask].mean()
    assert inside > outside  # the repainted region changed more than the kept one


def test_inpaint_refuses_a_4_channel_model():
    with pytest.raises(ValueError, match="not an inpainting model"):
        Inpaint(model_path("tiny"), device="cpu")


def test_masks():
    m = mask_from_meta({"mask": [8, 16, 32, 48]}, 64, 64)
    assert m[16:48, 8:32].all() and m.sum() == 255 * 24 * 32
    assert mask_from_meta({"mask": {"boxes": [[0, 0, 0.25, 0.25], [0.75, 0.75, 1, 1]]}}, 64, 64).sum() == 255 * 2 * 256
    assert mask_from_meta({"caption": "no mask"}, 64, 64) is None
    assert mask_from_meta({"mask": "nonsense"}, 64, 64) is None
    assert (center_mask(64, 64, 0.5) > 0).sum() == 32 * 32
    assert np.array_equal(random_mask(64, 64, seed=3), random_mask(64, 64, seed=3))
    assert not np.array_equal(random_mask(64, 64, seed=3), random_mask(64, 64, seed=4))
    assert make_mask("meta", 64, 64, meta=None) is None
    with pytest.raises(ValueError):
        make_mask("ellipse", 64, 64)
