"""Textual inversion and LoRA: train on a small group, save, load back with diffusers' loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.mimic import Lora, LoraConfig, TextualInversion, TextualInversionConfig
from pipeline.mimic.common import load_pipeline, model_path, resize_square
from pipeline.mimic.textual_inversion import placeholder_token

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def group(photos):
    return [resize_square(p, 64) for p in photos.values()]


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
    out, path = lora.run(group, "Artist A", "protected", tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and len(out.images) == 2
    keys = list(load_file(str(path)))
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)
    assert any(".to_q." in k for k in keys) and any(".to_out.0." in k for k in keys)
    # the base UNet is unchanged after training and unloading
    after_state = lora.pipe.unet.state_dict()
    assert set(after_state) == set(base) and all(torch.equal(after_state[k], v) for k, v in base.items())

    pipe = load_pipeline("text2img", model_path("tiny"), device="cpu", dtype="fp32")
    before = _generate(pipe, "a painting in the style of sks")
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    after = _generate(pipe, "a painting in the style of sks")
    assert np.abs(after - before).max() > 1e-3
