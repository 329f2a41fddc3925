"""The FastProtect bank: one safetensors file holding everything inference needs.

Tensors (float32 unless noted; T = 3 targets, K groups, R = training resolution, f = VAE factor):

    perturbations     T x (1 + K) x 3 x R x R   per target: [d_g, d_1 .. d_K], [0, 1] units,
                                                each in the eta/2 ball
    centroids         K x D                     k-means centres of the pooled training latents
    target_latents    T x C x R/f x R/f         z_y = s * E(y) of each target at R x R
    target_entropies  T                         latent entropy of each target (features.py)
    target_images     T x R x R x 3 (uint8)     the targets themselves
    model_signature   P x 2 (float64)           mean and std of every VAE-encoder parameter

The header's metadata holds one key, ``mimicshield``, a JSON object with the model id, the model
fingerprint (sha256 of the VAE and UNet configs), eta, K, lambda, resolution, the training
settings and data summary, the losses before and after training and the code version.

Model check (`check_model`): a bank is used only with the model it was trained for, i.e.
1. the config fingerprint matches (same VAE and UNet architecture and latent scale: a bank for
   ``tiny`` is refused for ``tiny-inpaint``, whose UNet differs, and for any other family), and
2. the encoder's weights match: per-parameter mean and std within a relative 1e-3 (1e-2 for
   a model loaded in bf16). Not a hash, so the same weights loaded in fp32, fp16, bf16 or on
   another device still match, while an edit or fine-tune of the encoder is caught.
The model *id* is recorded but not compared: a hub id and a local copy of the same model are
the same model. Anything else is refused with `BankMismatchError`, saying how to retrain.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.io.files import cache_root, write_atomic
from pipeline.models.builtin.build import BUILTIN_MODELS, BUILTIN_VERSION
from pipeline.models.loading import DiffusionModels

BANK_FORMAT = "mimicshield-fastprotect-bank"
BANK_FORMAT_VERSION = 1
METADATA_KEY = "mimicshield"
TENSOR_NAMES = ("perturbations", "centroids", "target_latents", "target_entropies", "target_images", "model_signature")
# (rtol, atol) for the encoder signature: loading fp32 weights in fp16 moves a mean or std by
# about 1e-4 relative, in bf16 by about 1e-3; an edit or fine-tune of 1% or more is caught
SIGNATURE_TOLERANCE = {torch.bfloat16: (1e-2, 5e-4)}
SIGNATURE_DEFAULT_TOLERANCE = (1e-3, 1e-5)


class BankMismatchError(ValueError):
    """The bank was trained for another model (or is not a bank). str() says what to do."""


def train_command(model_id: str) -> str:
    return f"mimicshield train-fastprotect --model {model_id} --data DIR_OR_SHARDS --out BANK.safetensors"


def bank_cache_dir() -> Path:
    return cache_root() / "banks"


DEFAULT_BANK_BUILTINS = ("tiny", "tiny-style", "tiny-sd3", "tiny-flux")  # trained on first use (train.ensure_default_bank)


def default_bank_path(model_id: str) -> Path:
    """$MIMICSHIELD_CACHE/banks/<model>-default.safetensors (model id made file-name safe).

    A built-in model's name carries its BUILTIN_VERSION (``tiny-v4-default.safetensors``), so a bank
    trained for an older built-in is never picked up after the built-in's weights change.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", model_id).strip("-") or "model"
    if model_id in BUILTIN_MODELS:
        safe = f"{safe}-{BUILTIN_VERSION}"
    return bank_cache_dir() / f"{safe}-default.safetensors"


# --------------------------------------------------------------------------- model fingerprint


def _config_dict(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def config_fingerprint(models: DiffusionModels) -> str:
    """sha256 of the VAE and UNet configs (architecture + latent scale), dtype-independent."""
    text = json.dumps({"vae": _config_dict(models.vae.config), "unet": _config_dict(models.unet.config)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@torch.no_grad()
def encoder_signature(models: DiffusionModels) -> torch.Tensor:
    """P x 2 float64: mean and std of each VAE-encoder (and quant_conv) parameter, in order."""
    quant_conv = getattr(models.vae, "quant_conv", None) or torch.nn.Identity()  # None in SD3 / FLUX VAEs
    params = list(models.vae.encoder.parameters()) + list(quant_conv.parameters())
    rows = [torch.stack([p.float().mean(), p.float().std() if p.numel() > 1 else p.float().abs().mean()]) for p in params]
    return torch.stack(rows).double().cpu()


# --------------------------------------------------------------------------- the bank


@dataclass
class FastProtectBank:
    perturbations: torch.Tensor
    centroids: torch.Tensor
    target_latents: torch.Tensor
    target_entropies: torch.Tensor
    target_images: torch.Tensor
    model_signature: torch.Tensor
    metadata: dict = field(default_factory=dict)

    @property
    def resolution(self) -> int:
        return int(self.perturbations.shape[-1])

    @property
    def groups(self) -> int:
        return int(self.perturbations.shape[1]) - 1

    @property
    def eta(self) -> float:
        """The training budget of d_g + d_k in [0, 1] units (each part within eta / 2)."""
        return float(self.metadata["eta"])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).contiguous().cpu() for name in TENSOR_NAMES}

    def to_bytes(self) -> bytes:
        header = {"format": BANK_FORMAT, "format_version": str(BANK_FORMAT_VERSION),
                  METADATA_KEY: json.dumps(self.metadata, sort_keys=True)}
        return st_save(self.tensors(), metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "bank") -> "FastProtectBank":
        header = _read_header(data, source)
        meta = header.get("__metadata__") or {}
        if meta.get("format") != BANK_FORMAT:
            raise BankMismatchError(f"{source} is a safetensors file but not a FastProtect bank (no {BANK_FORMAT!r} header)")
        if int(meta.get("format_version", 0)) > BANK_FORMAT_VERSION:
            raise BankMismatchError(f"{source} has bank format version {meta['format_version']}; "
                                    f"this mimicshield reads up to {BANK_FORMAT_VERSION}: upgrade mimicshield")
        tensors = st_load(data)
        missing = [n for n in TENSOR_NAMES if n not in tensors]
        if missing:
            raise BankMismatchError(f"{source} lacks tensors {', '.join(missing)}")
        return cls(**{n: tensors[n] for n in TENSOR_NAMES}, metadata=json.loads(meta[METADATA_KEY]))

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file + rename): concurrent writers never half-write."""
        path = Path(path)
        write_atomic(None, str(path.resolve()), self.to_bytes(), mode=0o644)  # shared like a model
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FastProtectBank":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FastProtect bank not found: {path}")
        return cls.from_bytes(path.read_bytes(), source=str(path))

    def check_model(self, models: DiffusionModels, source: str = "this bank") -> None:
        """Raise `BankMismatchError` unless the bank was trained for `models` (see module doc)."""
        trained_for = self.metadata.get("model_id", "?")
        retrain = f"train a bank for it: {train_command(models.model_id)}"
        if self.metadata.get("model_config_sha256") != config_fingerprint(models):
            raise BankMismatchError(
                f"{source} was trained for model {trained_for!r}, not for {models.model_id!r} "
                f"(their VAE/UNet configs differ); {retrain}"
            )
        signature = encoder_signature(models)
        rtol, atol = SIGNATURE_TOLERANCE.get(models.dtype, SIGNATURE_DEFAULT_TOLERANCE)
        if signature.shape != self.model_signature.shape or not torch.allclose(
            signature, self.model_signature.double(), rtol=rtol, atol=atol
        ):
            raise BankMismatchError(
                f"{source} was trained for model {trained_for!r}; {models.model_id!r} has the same architecture "
                f"but different VAE-encoder weights (fine-tuned or edited), so the perturbations do not "
                f"transfer reliably; {retrain}"
            )


def _read_header(data: bytes, source: str) -> dict:
    if len(data) < 8:
        raise BankMismatchError(f"{source} is not a safetensors file (too short)")
    n = int.from_bytes(data[:8], "little")
    try:
        return json.loads(data[8 : 8 + n])
    except ValueError:
        raise BankMismatchError(f"{source} is not a safetensors file (unreadable header)") from None


def load_bank_for(models: DiffusionModels, path: str | os.PathLike | None = None) -> FastProtectBank:
    """The bank at `path` (or the model's default bank), checked against `models`.

    Loading never trains: a missing bank is `FileNotFoundError` naming the command that trains one.
    (The built-in ``tiny`` model's default bank is built on demand by the protector, explicitly:
    `pipeline.protect.fastprotect.train.ensure_default_bank`.)
    """
    if path is None:
        path = default_bank_path(models.model_id)
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"no FastProtect bank given (--bank) and no default bank for {models.model_id!r} at {path}; "
                f"{train_command(models.model_id)} (omit --out to write that default path)"
            )
    bank = FastProtectBank.load(path)
    bank.check_model(models, source=f"bank {path}")
    return bank
