"""Model loading: built-ins are reproducible and offline, weights are frozen, bad ids fail at once.

The built-in `tiny` is generated once into the cache (MIMICSHIELD_CACHE, see conftest) and then
loaded through diffusers' `from_pretrained` like any real checkpoint.
"""

from __future__ import annotations

import socket

import pytest
import torch

from pipeline.models.builtin.build import BUILTIN_MODELS, builtin_model_path
from pipeline.models.loading import DEFAULT_MODEL, ModelLoadError, load_models


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection raises and is recorded."""
    attempts: list = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted in a test: {address}")

    def refuse_create(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted in a test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse_create)
    return attempts


def parts(models):
    return {"vae": models.vae, "unet": models.unet, "text_encoder": models.text_encoder}


def test_tiny_loads_identically_twice_without_network(tiny_models, no_network, monkeypatch):
    import huggingface_hub.constants

    # even with the hub allowed, a built-in (a local directory) must not touch the network
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    again = load_models("tiny", device="cpu", dtype="fp32")
    assert no_network == []
    for name, module in parts(tiny_models).items():
        first, second = module.state_dict(), parts(again)[name].state_dict()
        assert first.keys() == second.keys(), name
        for key in first:
            assert torch.equal(first[key], second[key]), f"{name}.{key}"
    assert again.latent_scale == tiny_models.latent_scale
    assert again.scheduler.config == tiny_models.scheduler.config


def test_tiny_is_a_diffusers_directory_in_the_cache(tiny_models):
    path = builtin_model_path("tiny")
    assert str(path) == tiny_models.path
    for sub in ("model_index.json", "vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        assert (path / sub).exists(), sub
    assert list((path / "unet").glob("*.safetensors")), "weights are stored as safetensors"


def test_weights_frozen_and_in_eval_mode(tiny_models):
    for name, module in parts(tiny_models).items():
        assert not module.training, name
        assert all(not p.requires_grad for p in module.parameters()), name


def test_shape_properties_of_tiny(tiny_models):
    assert tiny_models.vae_factor == 8
    assert tiny_models.pixel_multiple % 8 == 0
    assert tiny_models.latent_scale > 0
    assert tiny_models.device == torch.device("cpu") and tiny_models.dtype == torch.float32


def test_offline_tokenizer_handles_any_text(tiny_models):
    prompts = ["a photo", "an anime picture of a cat", "ünïcödé ✓ 画像", ""]
    emb = tiny_models.encode_prompts(prompts)
    assert emb.shape == (4, tiny_models.tokenizer.model_max_length, tiny_models.text_encoder.config.hidden_size)
    assert torch.isfinite(emb).all()
    assert not torch.equal(emb[0], emb[1])
    # the same prompt gives the same embedding, cached or not
    torch.testing.assert_close(tiny_models.encode_prompts(["a photo"])[0], emb[0])


def test_dtype_is_the_callers_choice(tiny_models):
    bf16 = load_models("tiny", device="cpu", dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    assert next(bf16.unet.parameters()).dtype == torch.bfloat16
    assert next(bf16.vae.parameters()).dtype == torch.bfloat16


def test_pipeline_loads_from_the_same_path(tiny_models):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.path, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.sample_size == tiny_models.unet.config.sample_size


@pytest.mark.parametrize("model_id", ["nobody-has-this/no-such-model-xyz", DEFAULT_MODEL])
def test_unreachable_hub_id_fails_at_once_naming_alternatives(model_id, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_models(model_id, device="cpu")
    message = str(info.value)
    assert model_id in message
    assert "local" in message and "tiny" in message
    assert no_network == [], "an offline load must not try the network"


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a diffusers model"):
        load_models(str(tmp_path), device="cpu")


def test_unknown_builtin_and_dtype():
    with pytest.raises(KeyError, match="tiny"):
        builtin_model_path("huge")
    with pytest.raises(ValueError, match="dtype"):
        load_models("tiny", device="cpu", dtype="fp8")
    assert set(BUILTIN_MODELS) >= {"tiny", "tiny-inpaint", "sd15-arch", "sd21-arch"}
