"""Textual inversion mimicry: learn one new word for a group's images, then prompt with it.

For each group (e.g. one artist's images, protected or clean) a placeholder token such as
``<artist-a>`` is added to the tokenizer (``tokenizer.add_tokens`` + ``resize_token_embeddings``),
initialised from an existing word, and only its embedding row v* is trained (Gal et al. 2022):

    v* = argmin_v E_{z, t, eps} || eps_theta(z_t, t, c_theta(y(v))) - eps ||^2

with y a template prompt holding the token ("a painting in the style of <artist-a>"). The
embedding is saved as safetensors ``{token: vector}``, the format diffusers'
`load_textual_inversion` reads; generation loads it back into a fresh pipeline that way.
For SDXL the token gets a row in both text encoders, trained together, saved as
``{"clip_l": v1, "clip_g": v2}`` (the SDXL embedding format) and loaded into each encoder with
`load_textual_inversion(..., text_encoder=, tokenizer=)`. The loss's target is eps or v (training.py).

Defaults are small so that a group trains in seconds on the built-in ``tiny`` model. Real use
(SD 1.5, 512 px): about 2000-3000 steps, learning rate 5e-4 x batch size, batch 4, 50
inference steps (diffusers' textual inversion example uses 3000 steps at lr 5e-4 x 4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.evaluate.mimic.common import is_flow_pipeline, pipeline_family
from pipeline.evaluate.mimic.training import (
    MimicTrainingConfig,
    TrainingMimic,
    encode_latents,
    group_seed,
    train_denoiser,
    training_parts,
)
from pipeline.models.loading import ModelSpec, pretrained_source


@dataclass
class TextualInversionConfig(MimicTrainingConfig):
    learning_rate: float = 5e-3
    initializer: str = "painting"  # the word the new embedding starts from
    train_templates: tuple[str, ...] = (
        "a painting in the style of {token}",
        "an artwork in the style of {token}",
        "a picture of {token}",
    )


def placeholder_token(group: str) -> str:
    """The new word of a group: ``<artist-a>`` for group "Artist A"."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(group).lower()).strip("-") or "group"
    return f"<{slug}>"


def save_embedding(embedding: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``{token: vector}`` as safetensors (loadable with `load_textual_inversion`)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in embedding.items()}, str(path))
    return path


class TextualInversion(TrainingMimic):
    """Trains one token per group and generates from it; the base model is loaded once."""

    scenario = "textual_inversion"
    config_class = TextualInversionConfig

    def __init__(self, model: "str | ModelSpec", config: TextualInversionConfig | None = None, device="auto", dtype="fp32"):
        self.source = pretrained_source(model)  # (path or hub id, revision kwargs)
        super().__init__(model, config, device, dtype)
        if is_flow_pipeline(self.pipe):
            raise ValueError(f"{getattr(model, 'model', model)}: textual inversion of SD3 / FLUX models (a T5 token) is "
                             "not implemented; use --scenario lora (the way FLUX styles are copied) or sdedit")

    @property
    def setting(self) -> str:
        return f"steps={self.config.steps}"

    @property
    def is_sdxl(self) -> bool:
        return pipeline_family(self.pipe) == "sdxl"

    def _fresh_text_models(self, dtype: torch.dtype) -> list[tuple[object, torch.nn.Module]]:
        """The base model's (tokenizer, text encoder) pairs, untouched by earlier groups (two for SDXL)."""
        from transformers import (
            CLIPTextModel,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
        )

        subfolders = [("tokenizer", "text_encoder", CLIPTextModel)]
        if self.is_sdxl:
            subfolders.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
        return [(CLIPTokenizer.from_pretrained(self.source[0], subfolder=tok, **self.source[1]),
                 cls.from_pretrained(self.source[0], subfolder=enc, torch_dtype=dtype, **self.source[1]).to(self.pipe.device))
                for tok, enc, cls in subfolders]

    def train(self, images: list[np.ndarray], group: str) -> dict[str, torch.Tensor]:
        """Learn the group's token from `images`; returns ``{token: vector}`` (SDXL: ``{clip_l, clip_g}``)."""
        cfg = self.config
        token = placeholder_token(group)
        pairs = self._fresh_text_models(torch.float32)
        rows, restores = [], []
        for tokenizer, encoder in pairs:
            if tokenizer.add_tokens(token) != 1:
                raise ValueError(f"token {token} already exists in the tokenizer; rename the group")
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # row set below
            token_id = tokenizer.convert_tokens_to_ids(token)
            init_ids = tokenizer(cfg.initializer, add_special_tokens=False).input_ids
            table = encoder.get_input_embeddings().weight
            encoder.requires_grad_(False)
            with torch.no_grad():
                table[token_id] = table[init_ids].mean(0)
            table.requires_grad_(True)
            keep = torch.ones(len(table), dtype=torch.bool, device=table.device)
            keep[token_id] = False
            rows.append((table, token_id))
            restores.append((table, table.detach().clone(), keep))

        def restore_other_rows():  # only the new row may change
            with torch.no_grad():
                for table, frozen, keep in restores:
                    table[keep] = frozen[keep]

        self.pipe.unet.requires_grad_(False)
        (tokenizer, encoder), *second = pairs
        parts = training_parts(self.pipe, self.pipe.unet, self.train_scheduler, text_encoder=encoder,
                               tokenizer=tokenizer, text_encoder_2=second[0][1] if second else None,
                               tokenizer_2=second[0][0] if second else None)
        latents = encode_latents(self.pipe, images, self.resolution)
        templates = [t.format(token=token) for t in cfg.train_templates]
        train_denoiser(
            parts, latents, lambda rng, n: [rng.choice(templates) for _ in range(n)], [t for t, _ in rows],
            steps=cfg.steps, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
            seed=group_seed(cfg.seed, group), text_grad=True, after_step=restore_other_rows,
            resolution=self.resolution,
        )
        vectors = [table[token_id].detach().cpu().clone() for table, token_id in rows]
        if self.is_sdxl:
            return {"clip_l": vectors[0][None], "clip_g": vectors[1][None]}
        return {token: vectors[0]}

    def generate(self, embedding_path: str | Path, group: str) -> list[np.ndarray]:
        """Images from the prompt template, with the embedding loaded by `load_textual_inversion`."""
        cfg = self.config
        token = placeholder_token(group)
        pairs = self._fresh_text_models(self.pipe.unet.dtype)
        self.pipe.tokenizer, self.pipe.text_encoder = pairs[0]
        if self.is_sdxl:
            from safetensors.torch import load_file

            self.pipe.tokenizer_2, self.pipe.text_encoder_2 = pairs[1]
            state = load_file(str(embedding_path))
            self.pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=self.pipe.text_encoder,
                                             tokenizer=self.pipe.tokenizer)
            self.pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=self.pipe.text_encoder_2,
                                             tokenizer=self.pipe.tokenizer_2)
        else:
            self.pipe.load_textual_inversion(str(embedding_path), token=token)
        return self.generate_for(cfg.prompt_template.format(token=token), group)

    def trained_file(self, images: list[np.ndarray], group: str, workdir: str | Path) -> Path:
        """Learn the group's token and save the embedding under `workdir`."""
        return save_embedding(self.train(images, group), Path(workdir) / "learned_embeds.safetensors")
