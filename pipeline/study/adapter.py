"""The study's one door to the rest of mimicshield: protection, reading samples, mimics, metrics.

Everything the study needs from the protect pipeline and the evaluation goes through the
functions below, so a change of their entry points (e.g. a typed model spec for `run_protect`)
is made here and nowhere else in pipeline/study/.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pipeline.batch.driver import run_protect
from pipeline.batch.settings import RunSettings
from pipeline.evaluate import mimic
from pipeline.evaluate import run as evaluation
from pipeline.io import images, metadata, samples, storage, tables
from pipeline.metrics import mimicry

# ---------------------------------------------------------------- protection


def protect_settings(settings, source, output: str) -> RunSettings:
    """The protect run of one source: the study's protect template with the source's method, eps and EOT."""
    template = settings.protect.config
    config = replace(template, method=source.base_method, eps=source.eps, eot=template.eot if source.eot else "",
                     eot_samples=template.eot_samples if source.eot else 1)
    return replace(settings.protect, output=output, config=config)


def protect(settings, source, output: str, log=print):
    """Protect settings.clean into `output` with the source's method and eps (resumes like `protect`)."""
    return run_protect(protect_settings(settings, source, output), log=log)


# ---------------------------------------------------------------- samples


def read_encoded(uri: str, s3) -> dict[str, tuple[bytes, str | None, str | None]]:
    """key -> (encoded image, JSON metadata, prompt) for every readable sample under `uri` (folder or shards)."""
    rows = samples.read_samples(uri, s3).take_all()
    return {r["key"]: (r["image"], r["meta"], r["prompt"]) for r in rows if r["image"] is not None}


def decode_all(encoded: dict, max_pixels: int) -> dict[str, np.ndarray]:
    """key -> pixels (keys in order) of every image in `encoded` that decodes within `max_pixels` (--max-pixels, as
    protect has it): one protect refused is an error row there, and no cell's image here."""
    out = {}
    for key in sorted(encoded):
        try:
            out[key] = images.decode_image(encoded[key][0], max_pixels).rgb
        except images.ImageError:
            continue
    return out


def sample_meta(meta: str | None) -> dict:
    return metadata.sample_meta(meta) or {}


def split_uri(uri: str, s3):
    return storage.split_uri(uri, s3)


# ---------------------------------------------------------------- mimics and metrics


def build_mimic(scenario: str, ev):
    """The scenario's mimic, loaded once (one per worker), from evaluate's settings `ev`."""
    if scenario == "sdedit":
        return mimic.SDEdit(ev.model, ev.sdedit, ev.model.device, ev.model.dtype)
    if scenario == "inpaint":
        return mimic.Inpaint(ev.inpaint_spec, ev.inpaint, ev.inpaint_spec.device, ev.inpaint_spec.dtype)
    if scenario == "textual_inversion":
        return mimic.TextualInversion(ev.model, ev.textual_inversion, ev.model.device)
    if scenario == "lora":
        return mimic.Lora(ev.model, ev.lora, ev.model.device)
    if scenario == "dreambooth":
        return mimic.DreamBooth(ev.model, ev.dreambooth, ev.model.device)
    raise ValueError(f"unknown scenario {scenario!r}")


def mimic_vae(model):
    """The VAE a mimic encodes its images with (a model-side attack adapts it: study/purify/cat.py)."""
    return model.pipe.vae


def is_training(scenario: str) -> bool:
    return scenario in mimic.TRAINING_SCENARIOS


def run_per_image(model, scenario: str, images, keys, source: str, prompts, metas):
    """SDEdit / inpainting outputs: one MimicOutput per setting."""
    kwargs = {"metas": metas} if scenario == "inpaint" else {}
    return model.run(images, keys, source, prompts=prompts, **kwargs)


def run_training(model, images, group: str, source: str, workdir: str):
    """Textual inversion / LoRA trained on `images`: (MimicOutput of generated images, weights path)."""
    return model.run(images, group, source, workdir)


def prompt_template(model) -> str:
    return model.config.prompt_template


def metrics(ev):
    return mimicry.Metrics(ev.metrics)


def calibrated(metric_set, metric: str, model) -> bool:
    return evaluation.calibrated(metric_set, metric, model.is_builtin)


def write_table(rows: list[dict], table_dir: str, fs, basename: str) -> str:
    return tables.write_table(rows, "robustness", table_dir, fs, basename=basename)


def save_generated(store, cell, group: str, out, trained) -> None:
    """Every image a training cell's mimic generated (``--save-images``), PNG + index.json (prompt, seed, the
    cell's method, eps and purification) under OUTPUT/generated/<scenario>/<cell id>/: evaluate's writer."""
    evaluation.write_generated(store.fs, f"{store.root}/generated/{cell.scenario}/{cell.id}", cell.scenario, group,
                               out, trained.config, {"source": cell.source.id, "method": cell.source.method,
                                                     "eps": float(cell.source.eps), "purification": cell.purification})
