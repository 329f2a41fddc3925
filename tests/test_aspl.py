"""ASPL (Anti-DreamBooth) on the built-in `tiny` model, and the pipeline's group unit.

- Budget on the written files; ASPL's objective (the loss of a model fine-tuned on the protected set, as the
  DreamBooth mimic meets it: aspl.mimic_loss) clearly above uniform noise of the same budget.
- A group is protected together: a member's perturbation depends on its group mates, not on their order.
- The LoRA surrogate (--low-memory) trains adapters on the shared UNet and leaves it clean.
- `mimicshield protect --method aspl --group-by folder`: each group in one actor task (the result equals the
  protector called on the group), every sample accounted for (written or an error row), budget on the files.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import SMALL_PHOTOS, to_x01
from PIL import Image

from pipeline.cli import main
from pipeline.io.images import decode_image
from pipeline.io.sample_data import png_bytes
from pipeline.protect import ProtectConfig, build_protector
from pipeline.protect.aspl import ASPLProtector, Surrogate, mimic_loss
from pipeline.protect.encoded import protect_encoded, quantize

EPS = 16
CONFIG = dict(method="aspl", eps=EPS, steps=12, step_size=2.0, seed=0)  # 2 rounds of K_f = 3, K_adv = 6
KEYS = [f"artist/{n}" for n in SMALL_PHOTOS]


def uniform_noise(images, eps, seed=0):
    rng = np.random.default_rng(seed)
    return [np.clip(x.astype(int) + rng.integers(-eps, eps + 1, size=x.shape), 0, 255).astype(np.uint8) for x in images]


@pytest.fixture(scope="module")
def written(tiny_models, photos_small):
    protector = build_protector(tiny_models, ProtectConfig(**CONFIG))
    assert isinstance(protector, ASPLProtector)
    results = protect_encoded(protector, KEYS, [png_bytes(p) for p in photos_small])
    assert all(r.error is None for r in results), [r.error for r in results]
    return [decode_image(r.data).rgb for r in results]


def test_aspl_holds_the_budget_on_written_files_and_beats_noise_on_its_objective(written, tiny_models, photos_small):
    """Measured (4 photos at 32 px, 12 steps, the mimic fine-tuned 20 steps at lr 1e-4): loss clean 0.289,
    noise 0.288, ASPL 0.350 (+0.062 over noise); the margin asked is half of that."""
    for clean, out in zip(photos_small, written):
        assert np.abs(out.astype(int) - clean.astype(int)).max() <= EPS
    prompts = ["a photo"] * len(written)
    clean, noise, aspl = (mimic_loss(tiny_models, to_x01(s), prompts, steps=20, learning_rate=1e-4)
                          for s in (photos_small, uniform_noise(photos_small, EPS), written))
    assert aspl - noise >= 0.031, (clean, noise, aspl)
    assert abs(noise - clean) < (aspl - noise) / 4


def test_a_group_is_protected_together_whatever_its_order(tiny_models, photos_small):
    protector = build_protector(tiny_models, ProtectConfig(**{**CONFIG, "steps": 6}))
    full = protector.protect(photos_small, KEYS)
    shuffled = protector.protect(photos_small[::-1], KEYS[::-1])[::-1]
    for a, b in zip(full, shuffled):
        np.testing.assert_array_equal(a, b)
    fewer = protector.protect(photos_small[:2], KEYS[:2])  # the same images in a smaller group: another surrogate
    assert not np.array_equal(quantize(full[0], EPS), quantize(fewer[0], EPS))


def test_chunking_the_group_changes_nothing_but_memory(tiny_models, photos_small):
    """The PGD steps and encodes run `chunk_size` images at a time: one at a time gives the group's result
    (up to float rounding in batched kernels)."""
    config = ProtectConfig(**{**CONFIG, "steps": 6})
    whole, single = build_protector(tiny_models, config), build_protector(tiny_models, config)
    whole.chunk_size, single.chunk_size = len(photos_small), 1
    for a, b in zip(whole.protect(photos_small, KEYS), single.protect(photos_small, KEYS)):
        assert np.mean(quantize(a, EPS) == quantize(b, EPS)) > 0.99


def test_lora_surrogate_trains_adapters_and_leaves_the_unet_clean(tiny_models, photos_small):
    unet = tiny_models.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    with Surrogate(tiny_models, "lora", 4) as theta:
        assert theta.net is unet  # no copy of the UNet
        assert 0 < sum(p.numel() for p in theta.params) < sum(p.numel() for p in before.values()) / 10
    config = ProtectConfig(**{**CONFIG, "steps": 6, "aspl": {"surrogate": "lora"}})
    deltas = build_protector(tiny_models, config).protect(photos_small, KEYS)
    assert all(np.abs(d).max() <= EPS for d in deltas)
    after = dict(unet.named_parameters())
    assert set(after) == set(before)  # the adapters are gone
    for n, p in after.items():
        assert not p.requires_grad and torch.equal(p, before[n]), n


def test_protect_command_protects_each_group_in_one_task(ray_local, tmp_path, photos_small, tiny_models):
    art = tmp_path / "art"
    groups = {"monet": photos_small[:2], "turner": photos_small[2:3]}
    for group, images in groups.items():
        (art / group).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(art / group / f"{i}.png")
    (art / "turner" / "broken.png").write_bytes(b"\x89PNG not an image")
    out = tmp_path / "out"
    code = main(["protect", str(art), str(out), "--model", "tiny", "--device", "cpu", "--method", "aspl",
                 "--steps", "6", "--step-size", "2", "--eps", str(EPS), "--group-by", "folder", "--no-progress"])
    assert code == 0
    errors = pq.read_table(out / "tables" / "errors").to_pylist()
    assert [e["key"] for e in errors] == ["turner/broken"]
    metrics = pq.read_table(out / "tables" / "protect_metrics").to_pylist()
    assert sorted(m["key"] for m in metrics) == ["monet/0", "monet/1", "turner/0"]  # every sample accounted for
    protector = build_protector(tiny_models, ProtectConfig(**{**CONFIG, "steps": 6}))
    for group, images in groups.items():
        keys = [f"{group}/{i}" for i in range(len(images))]
        expected = protector.protect(images, keys)  # the group, together, as one call
        for i, (clean, key) in enumerate(zip(images, keys)):
            written = np.asarray(Image.open(out / f"{key}.png").convert("RGB")).astype(int)
            assert np.abs(written - clean).max() <= EPS
            np.testing.assert_array_equal(written - clean, np.clip(clean + quantize(expected[i], EPS), 0, 255) - clean)
    config = json.loads(pq.read_table(out / "tables" / "runs").to_pylist()[0]["config"])
    assert config["group_by"] == "folder" and config["protect"]["aspl"]["surrogate"] == "full"


def test_the_resume_fingerprint_has_the_group_and_surrogate_for_aspl_only():
    from pipeline.batch.settings import RunSettings

    def fingerprint(method, **kwargs):
        return RunSettings("in", "out", config=ProtectConfig(method=method, **kwargs), group_by="folder").fingerprint(gpus=0)

    aspl = fingerprint("aspl")
    assert aspl["group_by"] == "folder" and aspl["aspl.surrogate"] == "full" and aspl["aspl.pgd_steps"] == 6
    assert fingerprint("aspl", aspl={"surrogate": "lora"}) != aspl  # the LoRA surrogate writes other bytes
    assert not any(k.startswith("aspl.") or k == "group_by" for k in fingerprint("sds-"))  # older outputs resume


def test_the_cost_counts_the_surrogate_memory_and_each_rounds_training(tiny_models, photos_small):
    """The memory gate adds the surrogate's weights, gradients, AdamW moments and snapshot (20 bytes per trainable
    parameter, counted from the UNet as peft's adapters are) to advdm's step; the estimate adds one measured
    surrogate round per round after the first."""
    from pipeline.protect.cost import MemoryGate, estimate

    full = build_protector(tiny_models, ProtectConfig(**{**CONFIG, "steps": 30}))
    lora = build_protector(tiny_models, ProtectConfig(**{**CONFIG, "aspl": {"surrogate": "lora"}}))
    advdm = build_protector(tiny_models, ProtectConfig(**{**CONFIG, "method": "advdm"}))
    assert full.resident_bytes() == 20 * sum(p.numel() for p in tiny_models.unet.parameters())
    counted = lora.resident_bytes()  # (before the adapters are in: they replace the projections)
    with Surrogate(tiny_models, "lora", 4) as theta:
        assert counted == 20 * sum(p.numel() for p in theta.params)
    assert advdm.resident_bytes() == 0 and advdm.rounds(30) == 1 and full.rounds(30) == 5
    extra = MemoryGate(full).peak_bytes(64, 64) - MemoryGate(advdm).peak_bytes(64, 64)
    assert extra == full.resident_bytes()

    guess = estimate(full, 64, 64)
    assert guess.seconds_per_round > 0
    assert guess.seconds_per_image >= 30 * guess.seconds_per_step + 4 * guess.seconds_per_round
