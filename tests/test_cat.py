"""CAT (`cat:STEPS[:METHOD]`): adapters in the VAE encoder, trained on the attacker's own protected images,
bring protected latents of images it never saw back towards the clean ones; the study's mimic carries them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.protect import ProtectConfig, build_protector
from pipeline.study.purify import PurifyContext, parse_purification
from pipeline.study.purify.cat import CAT, CATConfig, posterior_mean

SMALL = CATConfig(images=8, size=32)  # a few seconds on one core


@pytest.fixture(scope="module")
def context() -> PurifyContext:
    return PurifyContext(model="tiny", device="cpu", dtype="fp32", attack=ProtectConfig(steps=5, step_size=4),
                         attack_eps=16)


def train(spec: str, context, seed: int = 0) -> dict:
    unit = parse_purification(spec)
    unit.config = SMALL
    return unit.adaptation(context, seed=seed)


@pytest.fixture(scope="module")
def held_out() -> list[np.ndarray]:
    """Crops of the photos the tiny model and the attacker never trained on (rocket, motorcycle), 64 px."""
    from pipeline.data.photos import held_out_images

    return [np.round(x.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for x in held_out_images(64, crops_per_photo=2)]


def test_cat_spec_takes_a_method():
    assert parse_purification("cat").spec == "cat:100"
    assert parse_purification("cat:50:photoguard").spec == "cat:50"  # the default method is not spelled out
    unit = parse_purification("cat:50:sds-")
    assert (unit.spec, unit.option, unit.adapts_model) == ("cat:50:sds-", "sds-", True)
    for bad, reason in [("cat:0", "whole number"), ("cat:2.5", "whole number"), ("cat:10:nope", "unknown method"),
                        ("cat:10:fastprotect", "unknown method")]:
        with pytest.raises(ValueError, match=reason):
            parse_purification(bad)


def test_cat_leaves_the_image_alone(photos_small):
    out = parse_purification("cat:10").apply(photos_small, [str(i) for i in range(len(photos_small))])
    assert all(np.array_equal(a, b) for a, b in zip(out, photos_small))


def test_cat_brings_unseen_protected_latents_back_to_the_clean_ones(context, held_out):
    tensors = train("cat:30", context)
    assert tensors and all("lora_" in k and k.startswith(("encoder.", "quant_conv")) for k in tensors)
    again = train("cat:2", context), train("cat:2", context)
    assert all(torch.equal(v, w) for v, w in zip(*(a.values() for a in again)))  # seeded
    unit = parse_purification("cat:30")
    models = context.get("models", None)
    keys = [f"held-out/{i}" for i in range(len(held_out))]
    deltas = build_protector(models, ProtectConfig(method="photoguard", eps=16, steps=5, step_size=4)).protect(
        held_out, keys)
    protected = [np.clip(x + np.rint(d), 0, 255).astype(np.uint8) for x, d in zip(held_out, deltas)]
    vae = models.vae
    with torch.no_grad():
        clean = posterior_mean(vae, held_out)
        before = (posterior_mean(vae, protected) - clean).pow(2).mean().item()
        with unit.adapted(vae, tensors):
            after = (posterior_mean(vae, protected) - clean).pow(2).mean().item()
            drift = (posterior_mean(vae, held_out) - clean).pow(2).mean().item()
        with unit.adapted(vae, again[0]):
            few_steps = (posterior_mean(vae, protected) - clean).pow(2).mean().item()
        assert torch.equal(posterior_mean(vae, held_out), clean)  # the adapters are gone afterwards
    assert after < 0.7 * before  # the adapted encoder no longer follows the perturbation as far
    assert after < few_steps < before  # and more steps go further (the parameter's direction)
    assert drift < after  # and clean images keep their latents closer still


def test_the_study_mimic_encodes_through_the_committed_adapters(tmp_path, photos_small, monkeypatch):
    """workers.adapt_model commits the adapters once; a cat cell's mimic runs with them, and only while it runs."""
    from pipeline.cli import build_parser
    from pipeline.commands.study import settings_from_args
    from pipeline.study import adapter
    from pipeline.study.grid import CLEAN, Cell
    from pipeline.study.store import StudyStore, png
    from pipeline.study.workers import CellWorker, adapt_model, purify_set

    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    for i, img in enumerate(photos_small[:2]):
        (clean_dir / f"p{i}.png").write_bytes(png(np.asarray(img)))
    args = build_parser().parse_args([
        "study", str(clean_dir), str(tmp_path / "out"), "--model", "tiny", "--device", "cpu", "--methods", "photoguard",
        "--eps", "16", "--purifications", "none,cat:2", "--steps", "2", "--strengths", "0.3", "--sdedit-modes",
        "one_step", "--samples", "0", "--no-progress"])
    settings = settings_from_args(args)
    context = settings.purify_context()
    assert (context.attack_eps, context.attack.steps) == (16.0, 2)  # the study's budget and protect settings
    monkeypatch.setattr(CAT, "config", SMALL)  # every cat unit the workers parse trains small
    store = StudyStore(settings.output)
    assert store.read_adapter("cat:2") is None
    adapt_model(settings, "cat:2", context)
    tensors = store.read_adapter("cat:2")
    assert tensors and all("lora_" in k for k in tensors)
    encoded = {f"p{i}": ((clean_dir / f"p{i}.png").read_bytes(), None, None) for i in range(2)}
    for p in ("none", "cat:2"):
        purify_set(settings, CLEAN, p, encoded, context)
    worker = CellWorker(settings)
    vae = adapter.mimic_vae(worker.mimic("sdedit"))
    seen = []
    encode = vae.encode

    def spy(x, *a, **k):
        seen.append(any("lora_A" in n for n, _ in vae.named_parameters()))
        return encode(x, *a, **k)

    vae.encode = spy
    for p in ("none", "cat:2"):
        worker.run(Cell(CLEAN, p, "sdedit"), encoded)
    assert seen and seen[0] is False and seen[-1] is True  # the cat cell encoded through the adapters
    assert not any("lora_A" in n for n, _ in vae.named_parameters())  # and they are gone after it
    import pyarrow.parquet as pq

    values = {p: {r["metric"]: r["value"] for r in pq.read_table(store.cell_path(Cell(CLEAN, p, "sdedit"))).to_pylist()}
              for p in ("none", "cat:2")}
    assert values["none"]["psnr_ref"] != values["cat:2"]["psnr_ref"]  # same images, another encoder
