"""`cat:STEPS` and `cat:STEPS:METHOD`: CAT, LoRA adapters in the VAE encoder that undo latent-targeted perturbations.

Source: Peng et al., "CAT: Contrastive Adversarial Training for Evaluating the Robustness of Protective
Perturbations in Latent Diffusion Models" (ICML 2025). Its finding: protective perturbations work by
distorting the *latent* of the image, z = E(x + delta) far from E(x); a few low-rank adapters in the
encoder, trained adversarially, make the encoder stop reacting to such perturbations, and the mimic
learns from protected images as from clean ones. As issue 22 specifies the attack (the paper's own
loss is not reproduced here): the attacker protects *its own* clean images with a method it chooses
(METHOD, default `photoguard`, the encoder attack) at the study's largest budget, and trains LoRA
adapters (rank r, alpha = r, B = 0 at the start so E' = E) on every convolution and linear layer of
the encoder and `quant_conv` to map the perturbed latents to the clean ones while keeping the clean
ones where they were:

    min_{A, B}  E_x [ || mu'(x + delta(x)) - mu(x) ||^2  +  || mu'(x) - mu(x) ||^2 ]

with mu / mu' the posterior mean of the frozen / adapted encoder and delta(x) METHOD's perturbation of
x against the (unadapted) model. STEPS AdamW steps (lr 1e-3, batch 4) over `CATConfig.images` crops of
the bundled training photos (data/photos.py TRAIN_PHOTOS: never the study's images) at
the model's training side, each protected once with the study's protect settings (steps, step size,
seed; `PurifyContext.attack`) at `PurifyContext.attack_eps`. Seeded: the same study trains the same
adapters. More steps: stronger attack.

A model-side attack: it does not change the image. How it plugs into the study:

1. `run_study` trains the adapters once per `cat` spec, in a purification actor (`adaptation`), and
   commits them to OUTPUT/adapters/<spec>.safetensors (workers.adapt_model; a rerun reuses them);
2. the purified set is the source's images as they are (`apply` is the identity);
3. a `CellWorker` runs the cell's mimic with the adapters in its pipeline's VAE (`with_adapters`), removed
   when the cell ends: every image the mimic encodes (SDEdit's and inpainting's inputs, the training
   latents of LoRA and textual inversion) goes through the adapted encoder; the decoder is untouched.
   The clean baseline of the same cell is encoded the same way, so "damage" compares like with like.
   (The inpainting mimic's VAE is its inpainting model's: the adapters trained on the study model's VAE
   fit it when the two share their VAE, as SD and its inpainting twin, and tiny and tiny-inpaint, do.)
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

from pipeline.io.images import from_batch
from pipeline.models.fitting import fit
from pipeline.protect import ALL_METHODS, FASTPROTECT_METHODS
from pipeline.seeds import key_seed, seeded_global_rng
from pipeline.study.purify.base import Purification
from pipeline.study.purify.impress import vae_models

ADAPTER = "cat"  # the peft adapter's name in the VAE


@dataclass(frozen=True)
class CATConfig:
    images: int = 16  # the attacker's own clean images (crops of the bundled photos)
    size: int | None = None  # their side; None: the model's training side (512 for SD 1.5, 64 for tiny)
    rank: int = 4
    learning_rate: float = 1e-3
    batch_size: int = 4


def encoder_targets(vae) -> list[str]:
    """Every convolution and linear layer of the encoder, and quant_conv: where the adapters go."""
    names = {name.removesuffix(".base_layer") for name, m in vae.named_modules()  # adapters added before leave wrappers
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and ".lora_" not in name
             and name.startswith(("encoder.", "quant_conv"))}
    return sorted(names)


def lora_config(vae, rank: int):
    import peft

    return peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=encoder_targets(vae))


def attacker_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """The attacker's own clean images: n crops of the bundled training photos, size x size, uint8."""
    from pipeline.data.photos import TRAIN_PHOTOS, PhotoCrops

    crops = PhotoCrops(TRAIN_PHOTOS, seed=seed, colour=True).sample(n, size)[0]
    return from_batch(crops)


def posterior_mean(vae, images: list[np.ndarray]) -> torch.Tensor:
    from pipeline.evaluate.mimic.common import to_model_tensor

    x = to_model_tensor(images, images[0].shape[0]).to(vae.device, vae.dtype)
    return vae.encode(x).latent_dist.mean.float()


@contextmanager
def with_adapters(vae, tensors: dict[str, torch.Tensor]):
    """`vae` with the CAT adapters `tensors` in its encoder while the block runs; removed afterwards."""
    from peft.utils import set_peft_model_state_dict

    rank = next(v.shape[0] for k, v in tensors.items() if "lora_A" in k)
    vae.add_adapter(lora_config(vae, rank), adapter_name=ADAPTER)
    try:
        set_peft_model_state_dict(vae, {k: v.to(vae.device) for k, v in tensors.items()}, adapter_name=ADAPTER)
        vae.requires_grad_(False)
        yield vae
    finally:
        vae.delete_adapters(ADAPTER)


class CAT(Purification):
    name = "cat"
    adapts_model = True
    option_default = "photoguard"
    config = CATConfig()

    def check(self):
        if self.param != int(self.param) or self.param < 1:
            raise ValueError(f"cat:STEPS needs a whole number of steps >= 1, got {self.param:g}")
        if self.option not in ALL_METHODS or self.option in FASTPROTECT_METHODS:
            gradient = [m for m in ALL_METHODS if m not in FASTPROTECT_METHODS]
            raise ValueError(f"cat:STEPS:METHOD: unknown method {self.option!r}; choose from {', '.join(gradient)}")

    def apply(self, images, keys, seed=0, context=None):
        return [img.copy() for img in images]  # a model-side attack: the images stay as they are

    def adaptation(self, context, seed: int = 0) -> dict[str, torch.Tensor]:
        """Train the adapters as the attacker would (module doc); returns their tensors (CPU, float32)."""
        from peft.utils import get_peft_model_state_dict

        from pipeline.protect import ProtectConfig, build_protector

        cfg = self.config
        models = vae_models(context)
        vae = models.vae
        stream_seed = key_seed(seed, self.spec, "purify:cat")
        clean = attacker_images(cfg.images, cfg.size or models.training_side, stream_seed % 2**31)
        template = context.attack if context.attack is not None else ProtectConfig()
        protect = replace(template, method=self.option, eps=float(context.attack_eps), eot="", eot_samples=1,
                          resolution="native", seed=seed)
        keys = [f"cat/{i}" for i in range(len(clean))]
        deltas = build_protector(models, protect).protect(clean, keys)
        perturbed = [np.clip(x + np.rint(d), 0, 255).astype(np.uint8) for x, d in zip(clean, deltas)]
        with torch.no_grad():
            target = posterior_mean(vae, clean)
        with seeded_global_rng(stream_seed):  # the adapters' initial A
            vae.add_adapter(lora_config(vae, cfg.rank), adapter_name=ADAPTER)
        try:
            params = [p for p in vae.parameters() if p.requires_grad]
            for p in params:
                p.data = p.data.float()
            gen = torch.Generator().manual_seed(stream_seed)

            def loss_at(step):  # || mu'(x + delta(x)) - mu(x) ||^2 + || mu'(x) - mu(x) ||^2 on a batch
                idx = torch.randperm(len(clean), generator=gen)[: cfg.batch_size].tolist()
                adv = posterior_mean(vae, [perturbed[i] for i in idx])
                own = posterior_mean(vae, [clean[i] for i in idx])
                return (adv - target[idx]).pow(2).mean() + (own - target[idx]).pow(2).mean()

            fit(params, loss_at, steps=int(self.param), lr=cfg.learning_rate)  # AdamW, no weight decay
            return {k: v.detach().float().cpu().contiguous()
                    for k, v in get_peft_model_state_dict(vae, adapter_name=ADAPTER).items()}
        finally:
            vae.delete_adapters(ADAPTER)
            vae.requires_grad_(False)

    def adapted(self, vae, tensors):
        return with_adapters(vae, tensors)

    def metadata(self, context) -> dict[str, str]:
        """What the adapters file records beside its tensors (for whoever opens it)."""
        return {"spec": self.spec, "method": self.option, "eps": f"{context.attack_eps:g}",
                "config": json.dumps(self.config.__dict__)}


UNIT = CAT
