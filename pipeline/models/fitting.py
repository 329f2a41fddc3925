"""The one optimisation loop: everything in mimicshield that fine-tunes weights runs through `fit`.

Its users: the built-in models' training (`pipeline/train/`, and `models/builtin/build.py` for the built-ins
trained on first use), the training mimics (`evaluate/mimic/training.py`: textual inversion, LoRA, DreamBooth),
ASPL's surrogate (`protect/aspl.py`) and CAT's adapters (`study/purify/cat.py`). They differ only in what they
pass:

    theta <- AdamW(theta, grad loss_at(step); lr * factor(step), weight_decay)

with the gradient optionally clipped to a norm, the learning rate warmed up linearly over `warmup` steps and
then constant, or (decay) a cosine from 1 down to `lr_min / lr` (`lr_factor`), and optionally an exponential
moving average of the weights (`ema`) kept, evaluated and left in the model at the end.

With warmup 0, no decay, no clipping and no EMA it is plain AdamW, step for step the same numbers as
``opt.zero_grad(); loss.backward(); opt.step()``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch


def lr_factor(step: int, steps: int, warmup: int, decay: bool = False, floor: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then constant, or (decay) a cosine from 1 down to `floor` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    if not decay:
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)  # the loss of every step
    curve: list[dict] = field(default_factory=list)  # the points logged every `every` steps and at the last


def fit(
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    loss_at: Callable[[int], torch.Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    warmup: int = 0,
    decay: bool = False,
    lr_min: float = 0.0,
    after_step: Callable[[], None] | None = None,
    model: torch.nn.Module | None = None,
    ema: float = 0.0,
    every: int = 0,
    stage: str = "",
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    log: Callable[[dict], None] | None = None,
    checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
) -> FitResult:
    """Minimise ``loss_at(step)`` (steps 1..`steps`) over `params`: parameters, or param groups each with its lr.

    `after_step` runs after each optimiser step (textual inversion restores the embedding rows it must not change).
    `model` (the module that owns `params`) is needed for `ema` > 0 and for curve points: with `ema` the moving
    average of `model`'s weights is what is evaluated and checkpointed and, at the end, left in `model`.
    Every `every` steps (and at the last) a curve point {stage, step, seconds, loss (the mean since the last
    point), lr, **evaluate(shipped model)} goes to `log` and `checkpoint(step, shipped model)`.
    """
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params, "lr": lr}]
    groups = [{**g, "params": list(g["params"])} for g in groups]
    trained = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    floor = lr_min / lr if lr else 0.0  # (lr 0: a test's way of training nothing)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup, decay, floor))
    averaged = None
    if ema:  # the average of the last ~1/(1-ema) steps' weights: smoother than the last iterate
        swa = torch.optim.swa_utils
        averaged = swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(ema))
    result, start, running, since = FitResult(), time.time(), 0.0, 0
    for step in range(1, steps + 1):
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        if averaged is not None:
            averaged.update_parameters(model)
        value = loss.item()
        result.losses.append(value)
        running, since = running + value, since + 1
        if every and (step % every == 0 or step == steps):
            shipped = model if averaged is None else averaged.module
            point = {"stage": stage, "step": step, "seconds": round(time.time() - start, 1),
                     "loss": round(running / since, 5), "lr": round(sched.get_last_lr()[0], 6),
                     **(evaluate(shipped) if evaluate else {})}
            running, since = 0.0, 0
            result.curve.append(point)
            if log:
                log(point)
            if checkpoint:
                checkpoint(step, shipped)
    if averaged is not None:
        model.load_state_dict(averaged.module.state_dict())
    return result
