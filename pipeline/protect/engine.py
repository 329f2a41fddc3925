"""Batched projected gradient descent shared by every gradient-based protection method.

    x_0      = x + U(-eps, eps)            (random start; or x for a zero start)
    x_{k+1}  = Proj_{||x' - x||_inf <= eps, 0 <= x' <= 255} ( x_k + alpha * sign(d_k) )

d_k is the method's signed direction (methods.py). Budgets are in [0, 255] pixel units.

Ensembles (``--model A,B,...``): the protector holds several loaded models and each step uses

    d_k = sum_m  d_k^m / mean|d_k^m|        (per sample; mean over the image's elements)

with d_k^m the method's direction on model m, each with its own (t, eps) draw, prompt
embedding and target latent. Dividing by the mean absolute value puts every model's direction on
the same scale before they are summed, so a model whose gradient is larger (another VAE, latent
scale, or an eps vs a v target) cannot dominate the sign. This is the per-gradient L1
normalisation of MI-FGSM (Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018,
eq. 6: g / ||g||_1) applied per model instead of per iteration; the ensemble rule itself is the
one asked for in issue 14. With one model the step is exactly the single-model step.
Where protection works (``resolution``):

- ``auto`` (the default): at about the model's training area (sample_size x VAE factor, squared: 512^2
  for SD 1.x, 768^2 for SD 2.x-v, 1024^2 for SDXL), aspect kept and sides rounded to the model's multiple
  as aspect-bucketing trainers do, never larger than the image. The perturbation lives at full size
  and every step goes *through* the downscale a mimic applies first:

      x_w = R(x + delta)                      R: bilinear, antialiased (io/images.resize_pixels), as the
      d_full = J_R(x + delta)^T d(x_w)            training transforms of the diffusers scripts resize

  so the gradient lands on the full-size pixels (a vector-Jacobian product, like EOT's), the budget is
  enforced at full size, and the written file holds it exactly. The cost per step is that of the
  working size plus a resize: about flat in image size. An image already within the area is protected
  at its own size (as ``native``).
- ``native``: at the image's own size, padded to the model's multiple (cost grows as pixels^1.7).
- ``N``: on a square N x N copy (aspect squashed); the perturbation is mapped back to the original size
  afterwards, where it still lies in the eps-ball.

The perturbation is rounded when the file is written.

Randomness is per sample (seeded by the run seed and the sample's key), so a sample gets the
same protection whatever batch it lands in: reruns and resumed jobs are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.io.images import resize_perturbation, resize_pixels, to_tensor
from pipeline.models.diffusion import sample_timesteps
from pipeline.models.loading import DiffusionModels
from pipeline.protect.eot import EOTSampler, parse_eot
from pipeline.protect.methods import METHODS, StepInputs, encode, make_method
from pipeline.protect.names import ALL_METHODS, FASTPROTECT_METHODS, GRADIENT_METHODS, GROUP_METHODS  # noqa: F401
from pipeline.protect.targets import load_target
from pipeline.seeds import key_seed

DEFAULT_PROMPT = "a photo"
if tuple(METHODS) != GRADIENT_METHODS:  # the one list of names the command line offers (protect/names.py)
    raise ImportError(f"pipeline/protect/names.py GRADIENT_METHODS {GRADIENT_METHODS} != the registry {tuple(METHODS)}")


@dataclass
class FastProtectOptions:
    """What only `fastprotect` / `fastprotect+pgd` use (protect/fastprotect/infer.py)."""

    bank: str | None = None  # bank file; None: the model's default bank (built on the fly for tiny)
    lpips_weights: str | None = None  # torchvision AlexNet weights: calibrated LPIPS strength map (None: random)
    adaptive_strength: bool = True  # False skips the LPIPS-scaled strength (ablation)

    def __post_init__(self):
        for name in ("bank", "lpips_weights"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a path (str), got {type(value).__name__}")
        if not isinstance(self.adaptive_strength, bool):
            raise TypeError("adaptive_strength must be True or False")


@dataclass
class ASPLOptions:
    """What only `aspl` uses (protect/aspl.py). Defaults: Anti-DreamBooth's script (attack_with_aspl.sh):
    3 surrogate steps and 6 PGD steps per round (50 rounds = ``--steps 300``), lr 5e-7 for a full UNet;
    the LoRA surrogate (``--low-memory``) at rank 4 and lr 1e-4, as LoRA DreamBooth trains."""

    surrogate: str = "full"  # "full" (a trainable copy of the UNet) or "lora" (adapters on it: --low-memory)
    surrogate_steps: int = 3  # K_f: surrogate fine-tuning steps per round (max_f_train_steps)
    pgd_steps: int = 6  # K_adv: PGD steps per round (max_adv_train_steps); rounds = ceil(steps / pgd_steps)
    learning_rate: float = 5e-7  # the full surrogate's
    lora_learning_rate: float = 1e-4
    lora_rank: int = 4
    batch_size: int = 4  # images per surrogate training step (drawn from the group)

    def __post_init__(self):
        if self.surrogate not in ("full", "lora"):
            raise ValueError(f"aspl surrogate must be 'full' or 'lora', got {self.surrogate!r}")
        for name in ("surrogate_steps", "pgd_steps", "lora_rank", "batch_size"):
            if int(getattr(self, name)) < (0 if name == "surrogate_steps" else 1):
                raise ValueError(f"aspl {name} must be >= {0 if name == 'surrogate_steps' else 1}")
        if not (self.learning_rate > 0 and self.lora_learning_rate > 0):
            raise ValueError("aspl learning rates must be > 0")


@dataclass
class ProtectConfig:
    """Every knob of a protection run, validated once when built (method included).

    The runs table, each protected sample's ``mimicshield`` metadata and each protect_metrics row
    are written from this object (`record()`), so they cannot disagree.
    """

    method: str = "sds-"
    eps: float = 16.0  # L-inf budget, [0, 255] pixel units
    step_size: float = 1.0  # alpha, pixel units
    steps: int = 100
    init: str = "random"  # "random" (uniform in the eps-ball) or "zero"
    seed: int = 0
    prompt: str = DEFAULT_PROMPT  # used when a sample brings no prompt of its own
    target: str | None = None  # textural target image file; None = built-in pattern
    resolution: str = "auto"  # "auto" (the model's training area, through the resize), "native", or N (N x N copy)
    mist_weight: float = 1e4
    sdst_rate: float = 5.0
    eot: str = ""  # expectation over transformation, e.g. "jpeg:50-95,resize:0.5-1" (eot.py); "" = off
    eot_samples: int = 1  # K transforms averaged per PGD step when `eot` is set
    fastprotect: FastProtectOptions = field(default_factory=FastProtectOptions)
    aspl: ASPLOptions = field(default_factory=ASPLOptions)

    def __post_init__(self):
        self.resolution = str(self.resolution)
        if isinstance(self.aspl, dict):  # from a config file or asdict()
            self.aspl = ASPLOptions(**self.aspl)
        if not isinstance(self.aspl, ASPLOptions):
            raise TypeError(f"aspl must be ASPLOptions, got {type(self.aspl).__name__}")
        if isinstance(self.fastprotect, dict):  # from a config file or asdict()
            self.fastprotect = FastProtectOptions(**self.fastprotect)
        if not isinstance(self.fastprotect, FastProtectOptions):
            raise TypeError(f"fastprotect must be FastProtectOptions, got {type(self.fastprotect).__name__}")
        if self.method not in ALL_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(ALL_METHODS)}")
        if not 0 <= self.eps <= 255:
            raise ValueError(f"eps must be in [0, 255] pixel units, got {self.eps}")
        if self.step_size <= 0 or self.steps < 0:
            raise ValueError("step_size must be > 0 and steps >= 0")
        if self.init not in ("random", "zero"):
            raise ValueError(f"init must be 'random' or 'zero', got {self.init!r}")
        if self.resolution not in ("auto", "native") and not (self.resolution.isdigit() and int(self.resolution) > 0):
            raise ValueError(f"resolution must be 'auto', 'native' or a positive integer, got {self.resolution!r}")
        if self.eot:
            parse_eot(self.eot)
        if self.eot_samples < 1:
            raise ValueError(f"eot_samples must be >= 1, got {self.eot_samples}")

    def to_dict(self) -> dict:
        return asdict(self)

    def record(self) -> dict:
        """The parameters that identify a protected image (shard metadata, metric rows, runs table)."""
        return {"method": self.method, "eps": float(self.eps), "step_size": float(self.step_size),
                "steps": int(self.steps), "init": self.init, "seed": int(self.seed), "resolution": self.resolution}


def working_size(height: int, width: int, resolution: str, multiple: int,
                 training_side: int | None = None) -> tuple[int, int]:
    """The size protection runs at (see the module doc): padded up to `multiple` (native), N x N rounded to
    `multiple`, or (auto) about `training_side`^2 pixels with the aspect kept, never larger than the image."""
    if resolution == "auto":
        if training_side is None:
            raise ValueError("resolution 'auto' needs the model's training side")
        scale = math.sqrt(training_side**2 / (height * width))
        if scale < 1:
            def side(n: int) -> int:
                rounded = max(multiple, round(n * scale / multiple) * multiple)
                return rounded if rounded <= n else max(multiple, (n // multiple) * multiple)

            return side(height), side(width)
        resolution = "native"  # within the training area already
    if resolution == "native":
        return math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple
    side = max(multiple, round(int(resolution) / multiple) * multiple)
    return side, side


def working_mode(height: int, width: int, size: tuple[int, int], resolution: str) -> str:
    """How an image reaches its working size: "pad" (native), "through" (auto, downscaled each step), "copy" (N)."""
    if resolution == "native" or (resolution == "auto" and size[0] >= height and size[1] >= width):
        return "pad"
    return "through" if resolution == "auto" else "copy"


def to_working(rgb: np.ndarray, size: tuple[int, int], mode: str) -> torch.Tensor:
    """uint8 H x W x 3 -> float 3 x h x w in [0, 1] at the working size ("through": kept at full size)."""
    x = to_tensor(rgb)
    h, w = x.shape[2:]
    if mode == "pad":  # pad right/bottom by edge replication; cropped away afterwards
        return F.pad(x, (0, size[1] - w, 0, size[0] - h), mode="replicate")[0]
    if mode == "through":
        return x[0]
    return resize_pixels(x, size)[0]


def from_working(delta: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """Map a working-size perturbation (3 x h x w) back to the original H x W."""
    if mode in ("pad", "through"):
        return delta[:, :height, :width]
    return resize_perturbation(delta[None], (height, width))[0]  # stays inside the eps-ball


def start_to_working(delta: np.ndarray, size: tuple[int, int], mode: str) -> torch.Tensor:
    """A start perturbation (float H x W x 3, pixel units) -> 3 x h x w at the working size."""
    d = torch.as_tensor(np.ascontiguousarray(delta), dtype=torch.float32).permute(2, 0, 1)[None]
    if mode == "through":
        return d[0]
    if mode == "pad":
        return F.pad(d, (0, size[1] - d.shape[3], 0, size[0] - d.shape[2]), mode="replicate")[0]
    return resize_perturbation(d, size)[0]


def seen_by_models(x: torch.Tensor, working: tuple[int, int] | None) -> torch.Tensor:
    """R(x): the image as the models see it (`auto`: resized to the working size, differentiably; else x)."""
    return x if working is None else resize_pixels(x, working)


def pull_back(direction: torch.Tensor, x_seen: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d_full = J_R(x)^T d: a direction taken at x_seen = R(x), onto the pixels of x (x itself when R is identity)."""
    if x_seen is x:
        return direction
    (g,) = torch.autograd.grad(x_seen, x, grad_outputs=direction.to(x_seen.dtype))
    return g


def combine_directions(directions: list[torch.Tensor]) -> torch.Tensor:
    """sum_m d_m / mean|d_m| per sample (float32); a single direction is returned unchanged."""
    if len(directions) == 1:
        return directions[0]
    total = torch.zeros_like(directions[0], dtype=torch.float32)
    for d in directions:
        d = d.float()
        scale = d.abs().flatten(1).mean(1).clamp_min(torch.finfo(torch.float32).tiny)
        total += d / scale.view(-1, *([1] * (d.dim() - 1)))
    return total


class Protector:
    """Runs one protection method over batches of images with one loaded model, or an ensemble.

    Usage::

        protector = Protector(load_models("tiny"), ProtectConfig(method="sds-", steps=100))
        deltas = protector.protect([rgb_uint8, ...], keys=["a", ...])   # float H x W x 3 arrays
        ensemble = Protector(load_ensemble("tiny,tiny-v"), config)      # see the module doc
    """

    pgd_method: str | None = None  # a subclass's PGD objective when it is not config.method (aspl: advdm's loss)

    def __init__(self, models: DiffusionModels | Sequence[DiffusionModels], config: ProtectConfig):
        self.members: list[DiffusionModels] = [models] if isinstance(models, DiffusionModels) else list(models)
        if not self.members:
            raise ValueError("a protector needs at least one model")
        if len({m.device for m in self.members}) > 1:
            raise ValueError("the models of an ensemble must be on one device")
        self.models = self.members[0]  # the model of a single-model protector
        self.config = config
        self.method = make_method(self.pgd_method or config.method, config.mist_weight, config.sdst_rate)
        self._target = load_target(config.target)
        self._target_latents: dict[tuple[int, int, int], torch.Tensor] = {}

    @property
    def model_ids(self) -> list[str]:
        return [m.model_id for m in self.members]

    @property
    def pixel_multiple(self) -> int:
        """A working size every model of the ensemble accepts (least common multiple)."""
        return math.lcm(*(m.pixel_multiple for m in self.members))

    @property
    def training_side(self) -> int:
        """The side of the training area `auto` works at (an ensemble's largest: no member sees less)."""
        return max(m.training_side for m in self.members)

    def rounds(self, steps: int) -> int:
        """How often a protection of `steps` PGD steps pays a fixed cost beside its steps (aspl: one surrogate
        training per round); 1 for plain PGD. The cost estimate (protect/cost.py) times one such round."""
        return 1

    def resident_bytes(self) -> int:
        """Memory the protection holds for its whole run beside the models and one PGD step (aspl: the
        surrogate's trainable weights and optimiser state); the memory gate adds it to every step."""
        return 0

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """Where this protector works on an image of height x width (see the module doc)."""
        return working_size(height, width, self.config.resolution, self.pixel_multiple, self.training_side)

    def target_latent(self, size: tuple[int, int], member: int = 0) -> torch.Tensor:
        """s * E(y) of the textural target at a working size, for one model (computed once per size)."""
        key = (member, *size)
        if key not in self._target_latents:
            models = self.members[member]
            y = to_working(self._target, size, mode="copy")[None].to(models.device)
            with torch.no_grad():
                self._target_latents[key] = encode(models, y)
        return self._target_latents[key]

    def protect(
        self,
        images: list[np.ndarray],
        keys: list[str] | None = None,
        prompts: list[str | None] | None = None,
        starts: list[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Protect a list of uint8 H x W x 3 images; returns float perturbations (pixel units).

        Images are grouped by working size internally, so any mix of sizes is fine. `starts`
        (optional float H x W x 3 perturbations, pixel units) replace the random/zero start,
        e.g. FastProtect's perturbation for `fastprotect+pgd`.
        """
        keys = keys or [str(i) for i in range(len(images))]
        prompts = [p or self.config.prompt for p in (prompts or [None] * len(images))]
        groups: dict[tuple, list[int]] = {}  # (mode, working size[, full size]) -> images
        for i, rgb in enumerate(images):
            size = self.working_size(*rgb.shape[:2])
            mode = working_mode(*rgb.shape[:2], size, self.config.resolution)
            groups.setdefault((mode, size, rgb.shape[:2] if mode == "through" else None), []).append(i)
        out: list[np.ndarray | None] = [None] * len(images)
        for (mode, size, _), idx in groups.items():
            x = torch.stack([to_working(images[i], size, mode) for i in idx])
            start = None
            if starts is not None:  # mapped to the working size like the image (pad or resize)
                start = torch.stack([start_to_working(starts[i], size, mode) for i in idx])
            delta = self.protect_tensor(x, [keys[i] for i in idx], [prompts[i] for i in idx], start=start,
                                        working=size if mode == "through" else None)
            for j, i in enumerate(idx):
                h, w = images[i].shape[:2]
                d = from_working(delta[j], h, w, mode).clamp_(-self.config.eps, self.config.eps)
                out[i] = d.permute(1, 2, 0).numpy()
        return out  # type: ignore[return-value]

    def start_point(self, x: torch.Tensor, keys: list[str], start: torch.Tensor | None = None):
        """(per-key generators, x on the device, the PGD start x_0): `start` (pixel units) if given, else
        x + U(-eps, eps) (init random, drawn first from each key's generator) or x (init zero)."""
        cfg, device = self.config, self.models.device
        gens = [torch.Generator().manual_seed(key_seed(cfg.seed, k)) for k in keys]
        x_clean = x.to(device)
        if start is not None:
            start = start.to(device).float().clamp(-cfg.eps, cfg.eps) / 255.0
            x_adv = (x_clean + start).clamp(0, 1)
        elif cfg.init == "random":
            start = torch.stack([torch.rand(x.shape[1:], generator=g) for g in gens]) * 2 - 1
            x_adv = (x_clean + cfg.eps / 255.0 * start.to(device)).clamp(0, 1)
        else:
            x_adv = x_clean.clone()
        return gens, x_clean, x_adv

    def protect_tensor(
        self, x: torch.Tensor, keys: list[str], prompts: list[str], start: torch.Tensor | None = None,
        working: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """PGD on a batch of one size. x: B x 3 x H x W in [0, 1] on CPU. Returns delta * 255 (B x 3 x H x W).

        `start` (B x 3 x H x W, pixel units) replaces the configured init when given. `working` (h, w): the
        models see R(x + delta) resized to it and each direction is pulled back through R (module doc).
        """
        cfg = self.config
        device = self.models.device
        eps, alpha = cfg.eps / 255.0, cfg.step_size / 255.0
        gens, x_clean, x_adv = self.start_point(x, keys, start)
        height, width = working or x.shape[2:]
        fixed = []  # per model: (models, cond, added_cond, latent shape, target latent)
        for m, models in enumerate(self.members):
            latent_shape = (models.latent_channels, height // models.vae_factor, width // models.vae_factor)
            target = None
            if self.method.needs_target:
                target = self.target_latent((height, width), m).expand(len(keys), *latent_shape)
            fixed.append((models, models.encode_prompts(prompts), models.added_conditioning(prompts, height, width),
                          latent_shape, target))
        eot = None
        if cfg.eot:  # average each model's direction over K random differentiable transforms (eot.py)

            eot = EOTSampler(cfg.eot, cfg.eot_samples, cfg.seed, keys)
        for _ in range(cfg.steps):
            x_adv.requires_grad_(True)
            x_seen = seen_by_models(x_adv, working)
            directions = []
            for models, cond, added, latent_shape, target in fixed:  # draws: model by model, t then noise
                inputs = StepInputs(  # t as the model's own training draws it (U{0..T-1}; logit-normal for SD3)
                    cond=cond,
                    t=torch.cat([sample_timesteps(models.scheduler, 1, g, models.timestep_weighting)
                                 for g in gens]).to(device),
                    noise=torch.stack([torch.randn(latent_shape, generator=g) for g in gens]).to(device, models.dtype),
                    target_latent=target,
                    added_cond=added,
                )
                if eot is None:
                    directions.append(self.method.direction(models, x_seen, inputs))
                else:
                    directions.append(eot.direction(self.method, models, x_seen, inputs))
            direction = pull_back(combine_directions(directions), x_seen, x_adv)
            with torch.no_grad():
                x_adv = x_adv + alpha * direction.sign()
                x_adv = torch.min(torch.max(x_adv, x_clean - eps), x_clean + eps).clamp(0, 1)
        return ((x_adv.detach() - x_clean) * 255.0).float().cpu()
