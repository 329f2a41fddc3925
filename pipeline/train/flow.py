"""Train the flow-matching built-ins ``tiny-sd3`` and ``tiny-flux`` (CPU, seeded) and write their shipped weights.

Run ``python -m pipeline.train.flow --out DIR`` (FLOW_WEIGHTS_RECIPE in builtin/build.py). Per model:

1. The VAE: tiny's trained VAE (the shipped file, sha256 checked) widened from 4 to 16 latent channels
   without its 1x1 quant convs (SD3 and FLUX have none): tiny's quant_conv is folded into the encoder's
   output conv and its post_quant_conv into the decoder's input conv (exact up to the border pixels), the 12
   new encoder channels start small and random, the decoder reads them through zero weights; so the widened
   VAE starts as good as tiny's (`models/builtin/build.py: widen_vae`, which loading the shipped weights
   runs too). Then the latent-side layers (encoder norm/conv out, decoder conv in; TRAINABLE_VAE) are
   fine-tuned on recoloured 64 px photo crops, each model with its own seed (tiny.train_vae's loss:
   L1 + L2 + beta KL). The encoder's body stays tiny's, so transfer between tiny
   and these models is through a shared feature extractor: an upper bound on real SD -> FLUX transfer.
2. Latent shift and scale calibrated as SD3's and FLUX's are: shift = mean of E(x), scale = 1 / std(E(x) - shift).
3. The transformer learns the rectified-flow loss || v_theta(z_t, t, c) - (eps - z0) ||^2 with
   z_t = (1 - s) z0 + s eps, t drawn as the family's own training does (models.diffusion.sample_timesteps),
   conditioned on the (random, seeded, frozen) text encoders' embedding of the photo's caption, "a photo"
   or "" (classifier-free guidance needs an unconditional model).

Only the trained VAE layers, the transformer and the text encoders are written (fp16, a few MB); the rest of
the VAE is tiny's, loaded from tiny's shipped file.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.photos import (
    HELD_OUT,
    SEED,
    TRAIN_PHOTOS,
    PhotoCrops,
    held_out_images,
)
from pipeline.models.builtin import build as bm
from pipeline.models.builtin.build import widen_vae
from pipeline.models.diffusion import (
    TIMESTEP_SAMPLING,
    denoiser_family,
    denoising_loss,
    encode_text,
    sample_timesteps,
    text_parts,
    vae_latents,
)
from pipeline.models.fitting import fit
from pipeline.seeds import seeded_global_rng
from pipeline.train.curve import CurveLog
from pipeline.train.tiny import (
    CAPTIONS,
    VAETraining,
    captioned_batch,
    evaluate_vae,
    train_vae,
)

TRAINABLE_VAE = ("encoder.conv_norm_out.", "encoder.conv_out.", "decoder.conv_in.")


@torch.no_grad()
def calibrate_shift_scale(vae, n: int = 256, seed: int = SEED) -> tuple[float, float]:
    """shift = mean of E(x), scale = 1 / std(E(x) - shift) on training crops at 64 px; written to the config."""
    images = PhotoCrops(TRAIN_PHOTOS, seed + 2).sample(n, 64)[0]
    latents = torch.cat([vae.encode(b * 2 - 1).latent_dist.mean for b in images.split(64)])
    shift = round(float(latents.mean()), 4)
    scale = round(1.0 / float((latents - shift).std()), 4)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


@dataclass
class FlowTraining:
    steps: int = 1500
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 50
    pool: int = 1024
    uncond_prob: float = 0.1
    plain_prompt_prob: float = 0.3
    log_every: int = 100


def train_transformer(pipe, cfg: FlowTraining, log=None, seed: int = SEED) -> list[dict]:
    """The rectified-flow loss on latents of training crops (module doc, step 3); `pipe.transformer` in place."""
    transformer, scheduler, vae = pipe.transformer, pipe.scheduler, pipe.vae
    weighting = TIMESTEP_SAMPLING[denoiser_family(transformer)]
    data = PhotoCrops(TRAIN_PHOTOS, seed + 3)
    with torch.no_grad():
        lat, caps = [], []
        for start in range(0, cfg.pool, 64):
            x, which = data.sample(min(64, cfg.pool - start), 64)
            lat.append(vae_latents(vae, x * 2 - 1))
            caps.extend(which)
        latents, caption = torch.cat(lat), torch.tensor(caps)
        prompts = [CAPTIONS[n] for n in TRAIN_PHOTOS] + ["a photo", ""]
        cond, pooled = encode_text(text_parts(pipe), prompts)
    plain, empty = len(prompts) - 2, len(prompts) - 1
    gen = torch.Generator().manual_seed(seed + 5)

    def loss_at(step):
        _, _, z, cap = captioned_batch(latents, caption, cfg, gen, plain, empty)
        noise = torch.randn(z.shape, generator=gen)
        t = sample_timesteps(scheduler, cfg.batch, gen, weighting)
        return denoising_loss(transformer, scheduler, z, noise, t, cond[cap], {"pooled_projections": pooled[cap]})

    transformer.train()
    with seeded_global_rng(seed):
        curve = fit(transformer.parameters(), loss_at, model=transformer, steps=cfg.steps, lr=cfg.lr,
                    warmup=cfg.warmup, decay=True, max_grad_norm=1.0, every=cfg.log_every, stage="transformer",
                    lr_min=0.01 * cfg.lr, log=log).curve
    transformer.eval()
    return curve


def flow_weights(name: str, pipe) -> dict[str, torch.Tensor]:
    """What is shipped of built-in `name`: ``<name>.vae.<trained layer>``, ``<name>.transformer.*``, the text encoders."""
    out = {f"{name}.vae.{k}": v for k, v in pipe.vae.state_dict().items() if k.startswith(TRAINABLE_VAE)}
    out.update({f"{name}.transformer.{k}": v for k, v in pipe.transformer.state_dict().items()})
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, part, None)
        if module is not None:
            out.update({f"{name}.{part}.{k}": v for k, v in module.state_dict().items()})
    return {k: (v.half() if v.is_floating_point() else v).detach().contiguous() for k, v in out.items()}


def train_flow_builtins(out: Path, vae_cfg: VAETraining, flow_cfg: FlowTraining, names=bm.FLOW_BUILTINS) -> Path:
    """Train each flow built-in (VAE fine-tune, calibration, transformer); write FLOW_WEIGHTS_NAME into `out`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    log = CurveLog(out, fresh=False)  # (this script never cleared an earlier run's curve: kept so)
    tiny = bm.build_pipeline("tiny")
    bm.load_trained_weights(tiny, "tiny")
    held_out = held_out_images(64)
    log({"stage": "tiny-held-out", **evaluate_vae(tiny.vae, held_out)})
    tensors, metadata = {}, {"seed": str(SEED), "train_photos": ",".join(TRAIN_PHOTOS), "held_out": ",".join(HELD_OUT)}
    for i, name in enumerate(names):
        pipe = bm.build_pipeline(name)
        seed = bm.CONFIGS[name]["seed"]
        widen_vae(tiny.vae, pipe.vae, seed)
        log({"stage": f"{name}-widened", **evaluate_vae(pipe.vae, held_out)})
        for k, p in pipe.vae.named_parameters():
            p.requires_grad_(k.startswith(TRAINABLE_VAE))
        train_vae(pipe.vae, vae_cfg, log=log, seed=seed, stage=f"{name}-vae", data=PhotoCrops(TRAIN_PHOTOS, seed, colour=True))
        pipe.vae.requires_grad_(False)
        shift, scale = calibrate_shift_scale(pipe.vae)
        log({"stage": f"{name}-calibrated", "shift_factor": shift, "scaling_factor": scale,
             **evaluate_vae(pipe.vae, held_out)})
        for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, part, None) is not None:
                getattr(pipe, part).requires_grad_(False)
        train_transformer(pipe, flow_cfg, log=lambda p, n=name: log({**p, "stage": f"{n}-transformer"}), seed=seed)
        tensors.update(flow_weights(name, pipe))
        metadata.update({f"{name}.shift_factor": str(shift), f"{name}.scaling_factor": str(scale)})
    path = out / bm.FLOW_WEIGHTS_NAME
    save_file(tensors, path, metadata=metadata)
    log({"stage": "done", "weights": str(path), "sha256": bm.sha256(path)})
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--vae-lr", type=float, default=5e-4)
    p.add_argument("--steps", type=int, default=FlowTraining.steps, help="transformer steps")
    p.add_argument("--batch", type=int, default=FlowTraining.batch)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    vae_cfg = VAETraining(steps=a.vae_steps, batch=8, crop=64, lr=a.vae_lr, decay=True, ema=0.99, eval_every=100,
                          colour=True, warmup=20)
    train_flow_builtins(a.out, vae_cfg, FlowTraining(steps=a.steps, batch=a.batch))


if __name__ == "__main__":
    main()
