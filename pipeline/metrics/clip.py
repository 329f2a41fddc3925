"""CLIP similarities: image-image (pairs, and a set against references) and image-prompt (CLIP score).

Each is torchmetrics' CLIPScore formula, max(100 cos(E(a), E(b)), 0), averaged; computed here because
torchmetrics 1.9 reads transformers 5's CLIP outputs wrongly. The embeddings come from a local
transformers CLIP directory (e.g. a copy of openai/clip-vit-large-patch14: calibrated), or, without one,
from a small CLIPModel built from a config with seeded random weights (no download; uncalibrated).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from torch import nn

from pipeline.metrics.base import PROMPT, SET, Metric, PairMetric
from pipeline.models.builtin.build import build_tokenizer
from pipeline.seeds import seeded_global_rng

SEED = 1234  # the random CLIP's


def random_clip():
    """A small randomly initialised CLIPModel and its processor, built from a config (no download)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=64, patch_size=8, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=64,
    )
    with seeded_global_rng(SEED):
        model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        tokenizer=tokenizer,
    )
    return model, processor


class CLIPEmbeddings:
    """Unit-norm CLIP embeddings of images and texts; the model is loaded on first use, once."""

    def __init__(self, model: str | None = None, device: torch.device | str = "cpu"):
        self.model_path, self.device = model, torch.device(device)
        self.calibrated = bool(model)

    @cached_property
    def clip(self):
        """(CLIPModel, CLIPProcessor) on the device."""
        if self.model_path:
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(self.model_path).eval()
            processor = CLIPProcessor.from_pretrained(self.model_path)
        else:
            model, processor = random_clip()
        return model.to(self.device), processor

    @torch.no_grad()
    def images(self, images: list[np.ndarray]) -> torch.Tensor:
        model, processor = self.clip
        pixels = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return self._unit(model.get_image_features(pixel_values=pixels.to(self.device)))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        model, processor = self.clip
        tok = processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        return self._unit(model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                  attention_mask=tok["attention_mask"].to(self.device)))

    @staticmethod
    def _unit(feats) -> torch.Tensor:
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output  # transformers >= 5
        return nn.functional.normalize(feats.float(), dim=-1)


def clip_score(a: torch.Tensor, b: torch.Tensor) -> float:
    """torchmetrics' CLIPScore formula: mean of max(100 cos(a_i, b_i), 0) over unit-norm embeddings."""
    return float((100 * (a * b).sum(-1)).clamp(min=0).mean())


class CLIPImageSimilarity(PairMetric):
    """CLIP similarity (0-100) of image i and reference i, averaged."""

    name, higher_is_better = "clip_i2i", True

    def __init__(self, clip: CLIPEmbeddings):
        self.clip, self.calibrated = clip, clip.calibrated

    def compute(self, images, references) -> float:
        return clip_score(self.clip.images(images), self.clip.images(references))


class CLIPSetSimilarity(Metric):
    """CLIP similarity (0-100) of a generated set to its references, averaged over every (generated, reference)."""

    name, higher_is_better, compares = "clip_i2i_ref", True, SET

    def __init__(self, clip: CLIPEmbeddings):
        self.clip, self.calibrated = clip, clip.calibrated

    def __call__(self, generated: list[np.ndarray], references: list[np.ndarray]) -> float:
        g, r = self.clip.images(generated), self.clip.images(references)
        return float((100 * g @ r.T).clamp(min=0).mean())


class CLIPScore(Metric):
    """CLIP score (0-100): each image against its prompt (or one prompt for all), averaged."""

    name, higher_is_better, compares = "clip_score", True, PROMPT

    def __init__(self, clip: CLIPEmbeddings):
        self.clip, self.calibrated = clip, clip.calibrated

    def __call__(self, images: list[np.ndarray], prompts: list[str] | str) -> float:
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        return clip_score(self.clip.images(images), self.clip.texts(prompts))
