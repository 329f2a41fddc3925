"""Pre-training FastProtect's mixture of perturbations (MoP).

For each of the T = 3 targets y_j (targets.py) we learn one global perturbation d_g^j and K
group perturbations d_k^j, each in the eta/2 L-inf ball, so d_g + d_k stays in the eta ball.
A training image x belongs to group k(x): the nearest k-means++ centroid of its pooled latent
(features.py, kmeans.py). Its protected version is x_hat = clip(x + d_g^j + d_k(x)^j, 0, 1).

The paper's multi-layer protection loss, *maximised* by the perturbations:

    L(x_hat, y) = - || z(x_hat) - z_y ||^2  -  (lambda / L) * sum_{l=1..L} || F_l(x_hat) - F_l(y) ||^2

with z = s * E(.) the VAE latent and F_l the outputs of the encoder's L down blocks. We minimise
the distance D = -L (what the logs call ``loss``), which pulls the image's latent and features
toward those of the target, as PhotoGuard / Diff-Protect's textural loss does for one image.
Norms are sums of squares over all elements (per sample), averaged over the batch and the
three targets; lambda's scale (3.5e-5 by default) is tied to those sums.

Optimiser: Adam (lr 2e-4, betas (0.5, 0.99), the public re-implementation's values), on the
perturbations only, each projected back onto [-eta/2, eta/2] (clamp) after every step; they
start at zero. Choices the paper leaves open, taken here: batches drawn uniformly with
replacement; no augmentation; images squashed to R x R (aspect lost) exactly as inference
resizes the R x R perturbation to the image; the three MoP sets trained together (one encoder
pass over the 3B images; their losses are independent, so this equals training them apart);
group labels computed once, before training, on the clean images.

Training images come from a folder or shards (`pipeline.io`), or ``skimage`` (random crops of
scikit-image's bundled photos, for the built-in tiny bank). They are held in memory as R x R
uint8 (0.8 MB each at 512): cap them with `max_images`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.io.images import ImageError, decode_image, resize_pixels, to_tensor
from pipeline.io.samples import read_samples
from pipeline.io.storage import list_images, parse_uri
from pipeline.models.loading import DiffusionModels
from pipeline.protect.fastprotect.bank import (
    DEFAULT_BANK_BUILTINS,
    FastProtectBank,
    config_fingerprint,
    default_bank_path,
    encoder_signature,
)
from pipeline.protect.fastprotect.features import (
    ENTROPY_BINS,
    ENTROPY_RANGE,
    encode_with_features,
    feature_layer_names,
    latent_entropy,
    pooled_latent,
)
from pipeline.protect.fastprotect.kmeans import kmeans_pp

# the recipe lives in recipe.py (no torch: the command line shows its defaults at once); re-exported here
from pipeline.protect.fastprotect.recipe import TINY_DEFAULT, TINY_DEFAULT_IMAGES, TrainConfig  # noqa: F401
from pipeline.protect.fastprotect.targets import (
    TARGET_NAMES,
    repetition_targets,
    target_periods,
)
from pipeline.protect.methods import encode

# --------------------------------------------------------------------------- data


def skimage_crops(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """n random square crops (1/4 to all of the short side) of scikit-image's bundled photos."""
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "cat", "retina"]
    photos = [getattr(data, name)()[..., :3] for name in names]
    rng = np.random.default_rng(seed)
    crops, keys = [], []
    for i in range(n):
        j = i % len(photos)
        photo = photos[j]
        short = min(photo.shape[:2])
        side = int(rng.integers(short // 4, short + 1))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crops.append(np.ascontiguousarray(photo[top : top + side, left : left + side]))
        keys.append(f"skimage/{names[j]}/{i:05d}")
    return crops, keys


def _encoded_images(data: str, max_images: int | None, s3) -> tuple[list[tuple[str, bytes]], str]:
    filesystem, path, kind = parse_uri(data, s3)
    if kind == "folder":
        paths = list_images(filesystem, path, data)[:max_images]
        out = []
        for p in paths:
            with filesystem.open_input_file(p) as f:
                out.append((p, f.read()))
        return out, kind
    ds = read_samples(data, s3)
    rows = ds.take(max_images) if max_images else ds.take_all()
    return [(r["key"], r["image"]) for r in rows if r["image"]], kind


def load_training_images(
    data: str, resolution: int, max_images: int | None = None, seed: int = 0, s3=None
) -> tuple[torch.Tensor, dict]:
    """(N x 3 x R x R uint8, summary) from a folder / shards URI, or ``skimage``."""
    skipped = 0
    if data == "skimage":
        rgbs, keys = skimage_crops(max_images or TINY_DEFAULT_IMAGES, seed)
        kind = "builtin"
    else:
        encoded, kind = _encoded_images(data, max_images, s3)
        rgbs, keys = [], []
        for key, blob in encoded:
            try:
                rgbs.append(decode_image(blob).rgb)
                keys.append(key)
            except ImageError:
                skipped += 1
    if not rgbs:
        raise FileNotFoundError(f"no readable training images in {data} ({skipped} unreadable)")
    images = torch.stack([to_square(rgb, resolution) for rgb in rgbs])
    sizes = np.array([rgb.shape[:2] for rgb in rgbs])
    summary = {
        "source": data,
        "kind": kind,
        "n_images": len(rgbs),
        "n_skipped": skipped,
        "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
        "median_height": int(np.median(sizes[:, 0])),
        "median_width": int(np.median(sizes[:, 1])),
    }
    return images, summary


def to_square(rgb: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 H x W x 3 -> uint8 3 x R x R (bilinear, antialiased; aspect ratio not kept)."""
    x = resize_pixels(to_tensor(rgb), (resolution, resolution))
    return x[0].mul(255).round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- loss


def apply_mop(x01: torch.Tensor, perturbations: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(T * B) x 3 x R x R: clip(x + d_g^j + d_k(x)^j, 0, 1) for every target j (target-major)."""
    d = perturbations[:, :1] + perturbations[:, 1:][:, labels]  # T x B x 3 x R x R
    return (x01[None] + d).clamp(0, 1).flatten(0, 1)


def protection_distance(
    z: torch.Tensor, feats: list[torch.Tensor], z_y: torch.Tensor, feats_y: list[torch.Tensor], feature_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample (D, latent term, feature term) with D = ||z - z_y||^2 + (lambda/L) sum_l ||F_l - F_l_y||^2 = -L."""
    latent = (z.float() - z_y.float()).pow(2).flatten(1).sum(1)
    feature = sum((f.float() - fy.float()).pow(2).flatten(1).sum(1) for f, fy in zip(feats, feats_y)) / len(feats)
    return latent + feature_weight * feature, latent, feature


class MoPObjective:
    """D for a batch of clean images under a MoP, against each target's latent and features."""

    def __init__(self, models: DiffusionModels, target_images: torch.Tensor, feature_weight: float):
        self.models, self.feature_weight = models, feature_weight
        y = target_images.permute(0, 3, 1, 2).float().div(255).to(models.device)  # T x 3 x R x R
        with torch.no_grad():
            z_y, feats_y = encode_with_features(models, y)
        self.z_y, self.feats_y = z_y.detach(), [f.detach() for f in feats_y]

    def __call__(self, x01: torch.Tensor, perturbations: torch.Tensor, labels: torch.Tensor):
        t, b = perturbations.shape[0], x01.shape[0]
        z, feats = encode_with_features(self.models, apply_mop(x01, perturbations, labels))
        rep = lambda v: v.repeat_interleave(b, 0)  # noqa: E731  (target-major, like apply_mop)
        total, latent, feature = protection_distance(z, feats, rep(self.z_y), [rep(f) for f in self.feats_y],
                                                     self.feature_weight)
        return total.view(t, b), latent.view(t, b), feature.view(t, b)

    @torch.no_grad()
    def mean(self, images: torch.Tensor, perturbations: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
        """Mean D over `images` (uint8) and the targets."""
        total = []
        for i in range(0, len(images), batch):
            x = images[i : i + batch].to(self.models.device).float().div(255)
            total.append(self(x, perturbations, labels[i : i + batch].to(self.models.device))[0].flatten())
        return float(torch.cat(total).mean())


# --------------------------------------------------------------------------- training


@torch.no_grad()
def image_latents(models: DiffusionModels, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    return torch.cat([
        encode(models, images[i : i + batch].to(models.device).float().div(255)).float()
        for i in range(0, len(images), batch)
    ])


def code_version() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("mimicshield")
    except PackageNotFoundError:
        package = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"package": package, "git_commit": commit}


def train_bank(
    models: DiffusionModels,
    images: torch.Tensor,
    config: TrainConfig,
    data_summary: dict | None = None,
    log_path: str | Path | None = None,
    progress: bool = True,
) -> tuple[FastProtectBank, list[dict]]:
    """Train the three MoP sets on `images` (N x 3 x R x R uint8); returns (bank, loss history)."""
    started = time.time()
    device, r, k = models.device, config.resolution, config.groups
    if images.shape[-1] != r or images.shape[-2] != r:
        raise ValueError(f"training images must be {r} x {r}, got {tuple(images.shape[-2:])}")
    if r % models.vae_factor:
        raise ValueError(f"resolution {r} must be a multiple of the VAE factor {models.vae_factor}")
    gen = torch.Generator().manual_seed(config.seed)
    half = config.eta / 255.0 / 2  # each of d_g, d_k lies in the eta/2 ball ([0, 1] units)

    # groups: k-means++ on the pooled latents of the clean training images
    latents = image_latents(models, images, config.batch_size)
    centroids, labels = kmeans_pp(pooled_latent(latents, config.centroid_grid), k, gen, config.kmeans_iters)

    targets = torch.from_numpy(repetition_targets(r))  # T x R x R x 3 uint8
    objective = MoPObjective(models, targets, config.feature_weight)
    n_targets = targets.shape[0]
    delta = torch.zeros(n_targets, 1 + k, 3, r, r, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=config.lr, betas=config.betas)
    eval_images, eval_labels = images[:64], labels[:64]
    loss_initial = objective.mean(eval_images, delta.detach(), eval_labels, config.batch_size)

    history: list[dict] = []
    log_file = open(log_path, "w") if log_path else None
    bar = tqdm(range(config.steps), desc="train fastprotect", unit="step", disable=not progress)
    try:
        for step in bar:
            idx = torch.randint(len(images), (config.batch_size,), generator=gen)
            x = images[idx].to(device).float().div(255)
            total, latent, feature = objective(x, delta, labels[idx].to(device))
            loss = total.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                delta.clamp_(-half, half)  # projection onto the eta/2 balls
            if step % config.log_every == 0 or step == config.steps - 1:
                entry = {"step": step + 1, "loss": float(loss.detach()), "latent": float(latent.detach().mean()),
                         "feature": float(feature.detach().mean()),
                         "loss_per_target": [float(v) for v in total.detach().mean(1)],
                         "seconds": round(time.time() - started, 3)}
                history.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4g}")
                if log_file:
                    log_file.write(json.dumps(entry) + "\n")
                    log_file.flush()
    finally:
        bar.close()
        if log_file:
            log_file.close()
    perturbations = delta.detach().float()
    loss_final = objective.mean(eval_images, perturbations, eval_labels, config.batch_size)

    target_latents = objective.z_y.float().cpu()
    entropies = latent_entropy(objective.z_y).cpu()
    metadata = {
        "model_id": models.model_id,
        "model_config_sha256": config_fingerprint(models),
        "eta": config.eta / 255.0,
        "eta_pixels": config.eta,
        "groups": k,
        "feature_weight": config.feature_weight,
        "resolution": r,
        "feature_layers": feature_layer_names(models),
        "latent_scale": models.latent_scale,
        "vae_factor": models.vae_factor,
        "centroid_grid": config.centroid_grid,
        "entropy": {"bins": ENTROPY_BINS, "range": ENTROPY_RANGE, "unit": "bits"},
        "targets": {"names": list(TARGET_NAMES), "periods": target_periods(r),
                    "entropies": [float(e) for e in entropies]},
        "group_sizes": torch.bincount(labels, minlength=k).tolist(),
        "training": {**asdict(config), "optimizer": "adam", "init": "zero", "projection": "clamp each step",
                     "device": str(device), "dtype": str(models.dtype).replace("torch.", ""),
                     "seconds": round(time.time() - started, 3)},
        "data": data_summary or {"source": "unknown", "n_images": len(images)},
        "loss_initial": loss_initial,
        "loss_final": loss_final,
        "code_version": code_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    metadata = json.loads(json.dumps(metadata))  # plain JSON types: equal to what a reload gives
    bank = FastProtectBank(
        perturbations=perturbations.cpu(),
        centroids=centroids.cpu(),
        target_latents=target_latents,
        target_entropies=entropies.float(),
        target_images=targets,
        model_signature=encoder_signature(models),
        metadata=metadata,
    )
    return bank, history


def train_default_tiny_bank(models: DiffusionModels, path: str | Path, progress: bool = False) -> FastProtectBank:
    """Train and save the built-in tiny model's default bank with the fixed `TINY_DEFAULT` recipe."""
    cfg = TINY_DEFAULT
    images, summary = load_training_images("skimage", cfg.resolution, TINY_DEFAULT_IMAGES, cfg.seed)
    bank, _ = train_bank(models, images, cfg, summary, progress=progress)
    bank.save(path)
    return bank


def ensure_default_bank(models: DiffusionModels) -> Path:
    """The default bank path of `models`; for the built-in ``tiny`` (and ``tiny-style``) model, trained there first
    if missing.

    The same bank the README command ``mimicshield train-fastprotect --model tiny --data skimage``
    writes (the fixed `TINY_DEFAULT` recipe, about half a minute on CPU). Other models are not
    trained on the fly: their path is returned as it is and loading it names the command to run.
    """
    path = default_bank_path(models.model_id)
    if models.model_id in DEFAULT_BANK_BUILTINS and not path.is_file():
        import sys

        print(f"mimicshield: training the default FastProtect bank for {models.model_id!r} once (cached at {path})", file=sys.stderr)
        train_default_tiny_bank(models, path)
    return path
