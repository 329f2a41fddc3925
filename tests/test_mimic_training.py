"""Textual inversion and LoRA: train on a small group, save, load back with diffusers' loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluate.mimic import (
    Lora,
    LoraConfig,
    TextualInversion,
    TextualInversionConfig,
)
from pipeline.evaluate.mimic.common import load_pipeline, mimic_view
from pipeline.evaluate.mimic.textual_inversion import placeholder_token
from pipeline.models.loading import model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def group(photos):
    return [mimic_view(p, 64) for p in photos.values()]


def _generate(pipe, prompt: str) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    return pipe(prompt=prompt, num_inference_steps=2, guidance_scale=7.5, generator=gen, output_type="np").images[0]


def test_textual_inversion_trains_one_row_and_loads_back(group, tmp_path):
    cfg = TextualInversionConfig(steps=4, num_images=2, inference_steps=2)
    ti = TextualInversion(model_path("tiny"), cfg, device="cpu")
    embedding = ti.train(group, "Artist A")
    token = placeholder_token("Artist A")
    assert list(embedding) == [token] == ["<artist-a>"]
    init = ti.pipe.text_encoder.get_input_embeddings().weight  # untouched base table
    assert embedding[token].shape == init.shape[1:]

    out, path = ti.run(group, "Artist A", "clean", tmp_path / "ti")
    assert path.name == "learned_embeds.safetensors" and len(out.images) == 2
    assert out.setting == "steps=4" and out.keys == ["Artist A/0", "Artist A/1"]

    # loads into a fresh pipeline with diffusers' loader, and changes what the prompt generates
    pipe = load_pipeline("text2img", model_path("tiny"), device="cpu", dtype="fp32")
    prompt = f"a painting in the style of {token}"
    before = _generate(pipe, prompt)
    pipe.load_textual_inversion(str(path), token=token)
    assert len(pipe.tokenizer.tokenize(token)) == 1
    after = _generate(pipe, prompt)
    assert np.abs(after - before).max() > 1e-3


def test_lora_trains_saves_safetensors_and_loads_back(group, tmp_path):
    from safetensors.torch import load_file

    lora = Lora(model_path("tiny"), LoraConfig(rank=2, steps=4, num_images=2, inference_steps=2), device="cpu")
    base = {k: v.clone() for k, v in lora.pipe.unet.state_dict().items()}
    base_text = {k: v.clone() for k, v in lora.pipe.text_encoder.state_dict().items()}
    out, path = lora.run(group, "Artist A", "protected", tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and len(out.images) == 2
    keys = list(load_file(str(path)))
    assert keys and all(k.split(".")[0] in ("unet", "text_encoder") and "lora" in k for k in keys)
    assert any(".to_q." in k for k in keys) and any(".to_out.0." in k for k in keys)
    assert any(k.startswith("text_encoder.") and ".q_proj." in k for k in keys)  # text-encoder adapters too
    # the base UNet and text encoder are unchanged after training and unloading (the next group starts clean)
    after_state = lora.pipe.unet.state_dict()
    assert set(after_state) == set(base) and all(torch.equal(after_state[k], v) for k, v in base.items())
    after_text = lora.pipe.text_encoder.state_dict()
    assert set(after_text) == set(base_text) and all(torch.equal(after_text[k], v) for k, v in base_text.items())

    pipe = load_pipeline("text2img", model_path("tiny"), device="cpu", dtype="fp32")
    before = _generate(pipe, "a painting in the style of sks")
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    after = _generate(pipe, "a painting in the style of sks")
    assert np.abs(after - before).max() > 1e-3


def test_a_groups_lora_does_not_depend_on_what_ran_before(group, tmp_path):
    """The adapters' initial weights come from the group's seed, not from torch's global generator (peft's init
    draws from it): a group trained after other work in the process gets the same file as one trained first."""
    from safetensors.torch import load_file

    lora = Lora(model_path("tiny"), LoraConfig(rank=2, steps=2, num_images=1, inference_steps=2), device="cpu")
    first = load_file(str(lora.train(group, "Artist A", tmp_path / "first")))
    torch.rand(1000)  # other work moves the global generator
    again = load_file(str(lora.train(group, "Artist A", tmp_path / "again")))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    other = load_file(str(lora.train(group, "Artist B", tmp_path / "other")))
    assert not all(torch.equal(first[k], other[k]) for k in first)  # another group: another seed


# --------------------------------------------------------------------------- training really trains


def denoising_loss(unet, text_encoder, tokenizer, scheduler, latents, prompt: str, draws: int = 24) -> float:
    """E || eps_theta(z_t, t, c) - eps ||^2 over fixed draws, written here from the diffusers parts alone."""
    gen = torch.Generator().manual_seed(123)
    z = latents.repeat(draws, 1, 1, 1)
    noise = torch.randn(z.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z),), generator=gen)
    ids = tokenizer([prompt] * len(z), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = text_encoder(ids)[0]
        pred = unet(scheduler.add_noise(z, noise, t), t, encoder_hidden_states=cond).sample
    return float(((pred - noise) ** 2).mean())


@pytest.fixture(scope="module")
def group_latents(group):
    from diffusers import AutoencoderKL

    from pipeline.evaluate.mimic.common import to_model_tensor

    vae = AutoencoderKL.from_pretrained(model_path("tiny"), subfolder="vae")
    with torch.no_grad():
        return vae.encode(to_model_tensor(group, 64)).latent_dist.mean * vae.config.scaling_factor


def _text_model_with_row(token: str, row: torch.Tensor):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_path("tiny"), subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(model_path("tiny"), subfolder="text_encoder")
    tokenizer.add_tokens(token)
    encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)] = row
    return tokenizer, encoder


def test_textual_inversion_moves_its_embedding_and_lowers_its_loss(group, group_latents):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    token = placeholder_token("Artist A")
    tokenizer = CLIPTokenizer.from_pretrained(model_path("tiny"), subfolder="tokenizer")
    table = CLIPTextModel.from_pretrained(model_path("tiny"), subfolder="text_encoder").get_input_embeddings().weight
    initial = table[tokenizer("painting", add_special_tokens=False).input_ids].mean(0).detach()  # the initializer word

    untrained = TextualInversion(model_path("tiny"), TextualInversionConfig(steps=0), device="cpu").train(group, "Artist A")
    torch.testing.assert_close(untrained[token], initial)  # 0 steps: still the initializer (so the next check can fail)
    trained = TextualInversion(model_path("tiny"), TextualInversionConfig(steps=30, learning_rate=2e-2), device="cpu")
    learned = trained.train(group, "Artist A")[token]
    assert float((learned - initial).norm()) > 0.05 * float(initial.norm())

    unet = UNet2DConditionModel.from_pretrained(model_path("tiny"), subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model_path("tiny"), subfolder="scheduler")
    prompt = f"a painting in the style of {token}"
    before = denoising_loss(unet, *_text_model_with_row(token, initial)[::-1], scheduler, group_latents, prompt)
    after = denoising_loss(unet, *_text_model_with_row(token, learned)[::-1], scheduler, group_latents, prompt)
    assert after < before, (before, after)


def test_lora_learns_nonzero_adapters_that_lower_its_loss(group, group_latents, tmp_path):
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file

    cfg = LoraConfig(rank=2, steps=30, learning_rate=5e-3)
    path = Lora(model_path("tiny"), cfg, device="cpu").train(group, "Artist A", tmp_path / "lora")
    weights = load_file(str(path))
    up = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]  # B starts at zero: moved only by training
    assert up and all(float(v.abs().max()) > 0 for v in up)

    pipe = load_pipeline("text2img", model_path("tiny"), device="cpu", dtype="fp32")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prompt = "a painting in the style of sks"
    before = denoising_loss(pipe.unet, pipe.text_encoder, pipe.tokenizer, scheduler, group_latents, prompt)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    after = denoising_loss(pipe.unet, pipe.text_encoder, pipe.tokenizer, scheduler, group_latents, prompt)
    assert after < before, (before, after)
