"""Metrics of the mimicry evaluation: paired image metrics and set metrics, with their backbones.

Paired (image i of one list against image i of another, averaged):
- ``psnr``, ``ssim`` (torchmetrics, via pipeline.metrics.visibility: identical images give PSNR_CAP and 1),
- ``lpips`` (the lpips package, AlexNet trunk + the package's linear layers; identical -> 0),
- ``clip_i2i``: CLIP image-image similarity, max(100 cos(E(a), E(b)), 0) (torchmetrics' CLIPScore formula).

Set (a generated set against a reference set, or against its prompt):
- ``fid`` (torchmetrics FrechetInceptionDistance; only for sets of at least ``fid_min_images``),
- ``kid`` (torchmetrics KernelInceptionDistance, subset size min(kid_subset_size, n); for small sets),
- ``clip_score``: max(100 cos(E(image), E(prompt)), 0), averaged (torchmetrics' CLIPScore formula; computed
  here because torchmetrics 1.9 reads transformers 5's CLIP outputs wrongly),
- ``clip_i2i`` of a set: averaged over every (generated, reference) pair.

Backbones. Nothing is downloaded. Each network comes from a local weights path when given:
``lpips_weights`` (torchvision AlexNet state dict, .pth or .safetensors), ``clip_model`` (a
transformers CLIP directory, e.g. a local copy of openai/clip-vit-large-patch14) and
``fid_weights`` (torch-fidelity's Inception weights, ``pt_inception-2015-12-05-6726825d.pth``;
needs the torch-fidelity package). Without one, a seeded random network of the same kind is
used (AlexNet trunk, a small CLIPModel built from a config, a small conv feature extractor
for FID/KID) and `calibrated[metric]` is False: the numbers then rank settings within one run
but are not comparable with published figures. PSNR and SSIM need no backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from pipeline.io.images import center_crop_resize, resize_image, resize_pixels
from pipeline.metrics.lpips import build_lpips
from pipeline.metrics.visibility import PSNR_CAP, psnr, ssim  # noqa: F401  (PSNR_CAP re-exported for callers)
from pipeline.models.builtin.build import build_tokenizer
from pipeline.models.loading import resolve_device

RANDOM_SEED = 1234
PAIRED_METRICS = ("psnr", "ssim", "lpips")


@dataclass
class MetricConfig:
    lpips_weights: str | None = None
    clip_model: str | None = None
    fid_weights: str | None = None
    fid_min_images: int = 50  # FID of fewer images is dominated by its covariance estimate; use KID
    style_weights: str | None = None  # torchvision VGG-19 state dict for the style score (metrics/style.py)
    style_references: str | None = None  # extra candidate styles: "builtin" or a folder of sub-folders
    kid_subset_size: int = 1000
    device: str = "auto"


def _seeded(build):
    """Build a module under a fixed seed without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


def _batch(images: list[np.ndarray], size: int | None = None) -> torch.Tensor:
    """uint8 H x W x 3 arrays -> N x 3 x H x W uint8 (resized square to `size` when given)."""
    if size is not None:
        images = [resize_image(img, (size, size)) for img in images]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _same_size(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """b brought to a's sizes where they differ (mimic outputs vs references at native size): a square output
    gets the reference as the mimic saw it (shorter side resized, centre crop: io/images.center_crop_resize)."""

    out = []
    for x, y in zip(a, b):
        if x.shape != y.shape:
            y = center_crop_resize(y, x.shape[0]) if x.shape[0] == x.shape[1] else resize_image(y, x.shape[:2])
        out.append(y)
    return a, out


class RandomFeatures(nn.Module):
    """A small seeded conv net mapping uint8 images to 64 features: FID/KID's stand-in for Inception."""

    num_features = 64

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float() * 2 - 1
        x = resize_pixels(x, (64, 64))
        return self.net(x)


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
    model = _seeded(lambda: CLIPModel(config)).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        tokenizer=tokenizer,
    )
    return model, processor


class Metrics:
    """The metric backbones of one process (loaded lazily, once), and the functions using them."""

    def __init__(self, config: MetricConfig | None = None):
        self.config = config or MetricConfig()
        self.device = resolve_device(self.config.device)

    # ------------------------------------------------------------------ backbones

    @property
    def calibrated(self) -> dict[str, bool]:
        """Per metric: True when its backbone has real pretrained weights (or it needs none)."""
        cfg = self.config
        return {"psnr": True, "ssim": True, "lpips": cfg.lpips_weights is not None,
                "clip_i2i": cfg.clip_model is not None, "clip_score": cfg.clip_model is not None,
                "fid": cfg.fid_weights is not None, "kid": cfg.fid_weights is not None,
                "style_accuracy": cfg.style_weights is not None, "style_distance": cfg.style_weights is not None}

    @cached_property
    def lpips_net(self) -> nn.Module:
        return build_lpips(self.config.lpips_weights, self.device)[0]

    @cached_property
    def clip(self):
        if self.config.clip_model:
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(self.config.clip_model).eval()
            processor = CLIPProcessor.from_pretrained(self.config.clip_model)
        else:
            model, processor = random_clip()
        return model.to(self.device), processor

    def feature_extractor(self) -> nn.Module:
        """FID/KID features: torch-fidelity's Inception (2048 features) from `fid_weights`, else RandomFeatures."""
        if self.config.fid_weights:
            try:
                from torchmetrics.image.fid import NoTrainInceptionV3

                return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=self.config.fid_weights)
            except ModuleNotFoundError as err:
                raise RuntimeError("fid_weights needs the torch-fidelity package (pip install torch-fidelity)") from err
        return _seeded(RandomFeatures)

    # ------------------------------------------------------------------ paired

    @torch.no_grad()
    def lpips(self, a: list[np.ndarray], b: list[np.ndarray]) -> float:
        a, b = _same_size(a, b)
        values = []
        for x, y in zip(a, b):
            if np.array_equal(x, y):
                values.append(0.0)  # exactly, whatever the backbone
                continue
            tx = _batch([x]).float().to(self.device) / 127.5 - 1
            ty = _batch([y]).float().to(self.device) / 127.5 - 1
            values.append(float(self.lpips_net(tx, ty).mean()))
        return float(np.mean(values))

    def paired(self, a: list[np.ndarray], b: list[np.ndarray], clip: bool = False) -> dict[str, float]:
        """Mean PSNR, SSIM, LPIPS (and CLIP image-image similarity) of a[i] against b[i]."""
        if len(a) != len(b) or not a:
            raise ValueError(f"paired metrics need two equally long non-empty lists, got {len(a)} and {len(b)}")
        a, b = _same_size(a, b)
        out = {
            "psnr": float(np.mean([psnr(y, x) for x, y in zip(a, b)])),
            "ssim": float(np.nanmean([ssim(y, x) for x, y in zip(a, b)])) if min(a[0].shape[:2]) >= 11 else math.nan,
            "lpips": self.lpips(a, b),
        }
        if clip:
            out["clip_i2i"] = self.clip_i2i(a, b)
        return out

    # ------------------------------------------------------------------ CLIP

    @torch.no_grad()
    def _clip_features(self, images: list[np.ndarray] | None = None, texts: list[str] | None = None) -> torch.Tensor:
        """Unit-norm CLIP embeddings of images or texts."""
        model, processor = self.clip
        if images is not None:
            pixels = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
            feats = model.get_image_features(pixel_values=pixels.to(self.device))
        else:
            tok = processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
            feats = model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                            attention_mask=tok["attention_mask"].to(self.device))
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output  # transformers >= 5
        return nn.functional.normalize(feats.float(), dim=-1)

    @staticmethod
    def _score(a: torch.Tensor, b: torch.Tensor) -> float:
        """torchmetrics' CLIPScore formula: mean of max(100 cos(a_i, b_i), 0)."""
        return float((100 * (a * b).sum(-1)).clamp(min=0).mean())

    def clip_i2i(self, a: list[np.ndarray], b: list[np.ndarray]) -> float:
        """Mean CLIP image-image similarity of a[i] and b[i]."""
        a, b = _same_size(a, b)
        return self._score(self._clip_features(images=a), self._clip_features(images=b))

    def clip_i2i_set(self, generated: list[np.ndarray], references: list[np.ndarray]) -> float:
        """Mean CLIP image-image similarity over every (generated, reference) pair."""
        g, r = self._clip_features(images=generated), self._clip_features(images=references)
        return float((100 * g @ r.T).clamp(min=0).mean())

    def clip_score(self, images: list[np.ndarray], prompts: list[str] | str) -> float:
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        return self._score(self._clip_features(images=images), self._clip_features(texts=prompts))

    # ------------------------------------------------------------------ sets

    @torch.no_grad()
    def fid_kid(self, generated: list[np.ndarray], references: list[np.ndarray]) -> dict[str, float]:
        """FID (sets of at least fid_min_images) and KID (at least 2 images each) of generated vs references."""
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        n = min(len(generated), len(references))
        out: dict[str, float] = {}
        if n < 2:
            return out
        size = 299 if self.config.fid_weights else None
        fake = _batch(generated, size or generated[0].shape[0]).to(self.device)
        real = _batch(references, size or generated[0].shape[0]).to(self.device)
        features = self.feature_extractor()
        metrics = {"kid": KernelInceptionDistance(feature=features, subset_size=min(self.config.kid_subset_size, n))}
        if n >= self.config.fid_min_images:
            metrics["fid"] = FrechetInceptionDistance(feature=features)
        for name, metric in metrics.items():
            metric = metric.to(self.device)
            metric.update(real, real=True)
            metric.update(fake, real=False)
            value = metric.compute()
            out[name] = float(value[0] if isinstance(value, tuple) else value)
        return out

    def set_metrics(self, generated: list[np.ndarray], references: list[np.ndarray], prompt: str | None = None,
                    ) -> dict[str, float]:
        """FID/KID and CLIP image-image similarity against references; CLIP score against the prompt."""
        out = self.fid_kid(generated, references)
        out["clip_i2i"] = self.clip_i2i_set(generated, references)
        if prompt is not None:
            out["clip_score"] = self.clip_score(generated, prompt)
        return out


