"""The study's one door to the rest of mimicshield: protection, reading samples, mimics, metrics.

Everything the study needs from the protect pipeline and the evaluation goes through the
functions below, so a change of their entry points (e.g. a typed model spec for `run_protect`)
is made here and nowhere else in pipeline/study/.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

# ---------------------------------------------------------------- command-line options


def add_protect_options(parser: argparse.ArgumentParser) -> None:
    """`protect`'s options (method, eps, steps, model, device, ... and the Ray run ones)."""
    from ..commands.protect import add_protection_options, add_run_options

    add_protection_options(parser)
    add_run_options(parser)


def protect_config_from_args(args: argparse.Namespace):
    from ..commands.protect import config_from_args

    return config_from_args(args)


def apply_config_file(args: argparse.Namespace) -> dict:
    """Fill options left at their defaults from --config (YAML/JSON); returns its `s3` section."""
    from ..commands.protect import apply_config_file as apply

    return apply(args)


def eval_settings_from_args(args: argparse.Namespace, **fields):
    """evaluate's typed settings (mimic and metric configs) from a namespace of its option names."""
    from ..commands.evaluate import settings_from_args

    return settings_from_args(argparse.Namespace(**fields))


# ---------------------------------------------------------------- protection


def protect(settings, source, output: str, log=print):
    """Protect settings.clean into `output` with the source's method and eps (resumes like `protect`)."""
    from ..ray_pipeline import RunSettings, run_protect

    eot = settings.eot if source.eot else ""
    config = replace(settings.protect, method=source.base_method, eps=source.eps, eot=eot,
                     eot_samples=settings.eot_samples if source.eot else 1)
    run = RunSettings(input=settings.clean, output=output, config=config, model=settings.model,
                      batch_size=settings.batch_size, actors=settings.protect_actors,
                      address=settings.address, s3=dict(settings.s3), max_pixels=settings.max_pixels,
                      chunk_size=settings.chunk_size, progress=settings.progress)
    return run_protect(run, log=log)


def ensure_ray(address: str | None):
    from ..ray_pipeline import ensure_ray as ensure

    return ensure(address)


def short_error(err: BaseException) -> str:
    from ..ray_pipeline import short_error as short

    return short(err)


# ---------------------------------------------------------------- samples


def read_encoded(uri: str, s3: dict | None) -> dict[str, tuple[bytes, str | None]]:
    """key -> (encoded image, JSON metadata) for every readable sample under `uri` (folder or shards)."""
    from ..io import read_samples

    rows = read_samples(uri, s3 or None).take_all()
    return {r["key"]: (r["image"], r["meta"]) for r in rows if r["image"] is not None}


def decode(data: bytes) -> np.ndarray:
    """uint8 H x W x 3 (ImageError for a bad image)."""
    from ..images import decode_image

    return decode_image(data).rgb


def sample_meta(meta: str | None) -> dict:
    from ..io import sample_meta as parse

    return parse(meta) or {}


def split_uri(uri: str, s3: dict | None):
    from ..io import split_uri as split

    return split(uri, s3 or None)


# ---------------------------------------------------------------- mimics and metrics


def build_mimic(scenario: str, ev):
    """The scenario's mimic, loaded once (one per worker), from evaluate's settings `ev`."""
    from ..mimic import Inpaint, Lora, SDEdit, TextualInversion
    from ..mimic.common import inpaint_model_for, model_path

    if scenario == "sdedit":
        return SDEdit(model_path(ev.model), ev.sdedit, ev.device, ev.dtype)
    if scenario == "inpaint":
        return Inpaint(model_path(ev.inpaint_model or inpaint_model_for(ev.model)), ev.inpaint, ev.device, ev.dtype)
    if scenario == "textual_inversion":
        return TextualInversion(model_path(ev.model), ev.textual_inversion, ev.device)
    if scenario == "lora":
        return Lora(model_path(ev.model), ev.lora, ev.device)
    raise ValueError(f"unknown scenario {scenario!r}")


def is_training(scenario: str) -> bool:
    from ..mimic import TRAINING_SCENARIOS

    return scenario in TRAINING_SCENARIOS


def run_per_image(mimic, scenario: str, images, keys, source: str, prompts, metas):
    """SDEdit / inpainting outputs: one MimicOutput per setting."""
    kwargs = {"metas": metas} if scenario == "inpaint" else {}
    return mimic.run(images, keys, source, prompts=prompts, **kwargs)


def run_training(mimic, images, group: str, source: str, workdir: str):
    """Textual inversion / LoRA trained on `images`: (MimicOutput of generated images, weights path)."""
    return mimic.run(images, group, source, workdir)


def prompt_template(mimic) -> str:
    return mimic.config.prompt_template


def metrics(ev):
    from ..eval_metrics import Metrics

    return Metrics(ev.metrics)


def calibrated(metric_set, metric: str, model: str) -> bool:
    from ..builtin_models import BUILTIN_MODELS
    from ..evaluate import calibrated as is_calibrated

    return is_calibrated(metric_set, metric, model in BUILTIN_MODELS)


def write_table(rows: list[dict], table_dir: str, fs, basename: str) -> str:
    from ..tables import write_table as write

    return write(rows, "robustness", table_dir, fs, basename=basename)
