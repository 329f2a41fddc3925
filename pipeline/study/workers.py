"""The study's units of work, run as Ray tasks and actors (and callable directly, as in the tests).

- `purify_set`: one source set under one purification -> OUTPUT/purified/<p>/<source>.tar.
  CPU purifications run as plain Ray tasks; model-based ones in `PurifyActor`s, which load the
  model (or the upscaler) once.
- `adapt_model`: a model-side attack's adapters (cat), trained once per spec in a `PurifyActor`
  -> OUTPUT/adapters/<p>.safetensors.
- `CellWorker`: one cell = a scenario's mimic on one purified set, measured against the clean
  originals -> OUTPUT/tables/robustness/<cell>.parquet. Mimics are loaded once per actor; a cell
  of a model-side attack runs its mimic with the attack's adapters in the mimic's VAE.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time

import numpy as np

from pipeline.io.metadata import sample_group
from pipeline.metrics import METRICS
from pipeline.metrics.base import measure
from pipeline.study import adapter
from pipeline.study.grid import Cell, Source
from pipeline.study.purify import PurifyContext, parse_purification
from pipeline.study.store import StudyStore

# higher = the mimic got closer: psnr, ssim, clip_i2i, clip_score, style_accuracy
SIMILARITIES = frozenset(m.name.removesuffix("_ref") for m in METRICS if m.higher_is_better)


def damage(metric: str, value: float, baseline: float | None) -> float | None:
    """How much worse than the purified clean baseline, positive when the protection hurts the mimic."""
    if baseline is None or value is None or math.isnan(value) or math.isnan(baseline):
        return None
    base = metric.removesuffix("_ref").removesuffix("_pair")
    return baseline - value if base in SIMILARITIES else value - baseline


def purify_set(settings, source: Source, purification: str, encoded: dict, context: PurifyContext | None = None,
               ) -> dict:
    """Purify every image of one source set and commit the purified tar; returns counts and seconds."""
    start = time.perf_counter()
    unit = parse_purification(purification)
    pixels = adapter.decode_all(encoded, settings.protect.max_pixels)
    keys, images = list(pixels), list(pixels.values())
    out = unit.apply(images, keys, seed=settings.seed, context=context or settings.purify_context())
    store = StudyStore(settings.output, settings.s3)
    store.write_purified(source, purification, dict(zip(keys, out)))
    return {"source": source.id, "purification": purification, "images": len(keys),
            "seconds": time.perf_counter() - start}


def adapt_model(settings, purification: str, context: PurifyContext | None = None) -> dict:
    """Train a model-side attack's adapters (the unit's `adaptation`) and commit them; returns counts and seconds."""
    start = time.perf_counter()
    unit = parse_purification(purification)
    context = context or settings.purify_context()
    tensors = unit.adaptation(context, seed=settings.seed)
    StudyStore(settings.output, settings.s3).write_adapter(purification, tensors, unit.metadata(context))
    return {"purification": purification, "tensors": len(tensors), "seconds": time.perf_counter() - start}


class PurifyActor:
    """Ray actor for model-based purifications: the context (models) is loaded once."""

    def __init__(self, settings, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.settings = settings
        self.context = settings.purify_context()

    def run(self, source: Source, purification: str, encoded: dict) -> dict:
        return purify_set(self.settings, source, purification, encoded, self.context)

    def adapt(self, purification: str) -> dict:
        return adapt_model(self.settings, purification, self.context)


class CellWorker:
    """Ray actor: runs cells (one scenario's mimic on one purified set) and commits their rows."""

    def __init__(self, settings, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.s = settings
        self.ev = settings.evaluation
        self.metrics = adapter.metrics(self.ev)
        self.mimics: dict[str, object] = {}
        self.store = StudyStore(settings.output, settings.s3)
        self.style_metrics: dict[tuple, tuple] = {}

    def style(self, artist: str, originals: list[np.ndarray], resolution: int):
        """Style accuracy and distance of the training cells: the artist's clean originals among --style-references."""
        from pipeline.metrics.style import merge_references, reference_styles

        if (artist, resolution) not in self.style_metrics:
            refs = merge_references(reference_styles(self.ev.metrics.style_references, self.s.s3), {artist: originals})
            self.style_metrics[(artist, resolution)] = self.metrics.style(refs, resolution)
        return self.style_metrics[(artist, resolution)]

    def mimic(self, scenario: str):
        if scenario not in self.mimics:
            self.mimics[scenario] = adapter.build_mimic(scenario, self.ev)
        return self.mimics[scenario]

    def run(self, cell: Cell, clean: dict, baseline: dict | None = None) -> dict:
        """Compute and commit one cell. `clean`: key -> (encoded original, metadata JSON, prompt);
        `baseline`: (setting, metric) -> value of the clean cell under the same purification."""
        start = time.perf_counter()
        purified = self.store.read_purified(cell.source, cell.purification)
        decoded = adapter.decode_all({k: clean[k] for k in purified if k in clean}, self.s.protect.max_pixels)
        keys = list(decoded)
        images = [purified[k] for k in keys]
        originals = decoded
        metas = [adapter.sample_meta(clean[k][1]) for k in keys]
        prompts = [clean[k][2] or self.ev.prompt for k in keys]  # the sample's own prompt (io/metadata.py)
        mimic = self.mimic(cell.scenario)
        unit = parse_purification(cell.purification)
        with self.adapted(mimic, unit):
            results, samples = self.measure(cell, mimic, keys, images, originals, metas, prompts)
        for key in keys[: self.s.samples]:
            self.store.write_sample(cell, key, "in", purified[key])
            if key in samples:
                self.store.write_sample(cell, key, "out", samples[key])
        cell_seconds = time.perf_counter() - start
        rows = []
        for setting, metric, value, n, seconds in results:
            value = float(value)
            base = value if cell.source.is_clean else (baseline or {}).get((setting, metric))
            rows.append({
                "method": cell.source.method, "eps": float(cell.source.eps), "purification": cell.purification,
                "purification_name": unit.name, "strength": unit.param, "scenario": cell.scenario,
                "setting": setting, "metric": metric, "value": value, "n_images": int(n),
                "calibrated": adapter.calibrated(self.metrics, metric, self.ev.model), "seconds": float(seconds),
                "cell_seconds": cell_seconds, "baseline": base,
                "damage": 0.0 if cell.source.is_clean else damage(metric, value, base),
            })
        self.store.write_cell(cell, rows)  # the commit: the cell is done once this file exists
        return {"cell": cell.id, "rows": len(rows), "images": len(keys), "seconds": time.perf_counter() - start}

    def adapted(self, mimic, unit):
        """The mimic's VAE with a model-side attack's committed adapters while the cell runs (else nothing)."""
        if not unit.adapts_model:
            return contextlib.nullcontext()
        tensors = self.store.read_adapter(unit.spec)
        if tensors is None:
            raise RuntimeError(f"the adapters of {unit.spec} are missing under {self.store.output}/adapters/ "
                               "(run_study trains them before the cells)")
        return unit.adapted(adapter.mimic_vae(mimic), tensors)

    def measure(self, cell: Cell, mimic, keys, images, originals, metas, prompts) -> tuple[list, dict]:
        """The cell's mimic on its images: ([(setting, metric, value, n, seconds)], {key: sample output})."""
        results = []  # (setting, metric, value, n, seconds)
        samples: dict[str, np.ndarray] = {}
        if adapter.is_training(cell.scenario):
            # one artist (the --group-by field, default "artist"; "folder": sub-folders): its name, else "all"
            artists = {sample_group(k, m, self.ev.group_by) for k, m in zip(keys, metas)}
            group = artists.pop() if len(artists) == 1 and None not in artists else "all"
            with tempfile.TemporaryDirectory(prefix="mimicshield-study-") as tmp:
                out, _ = adapter.run_training(mimic, images, group, cell.source.id, tmp)
            prompt = adapter.prompt_template(mimic).format(token=group)
            refs = [originals[k] for k in keys]
            for m, value in measure(self.metrics.sets, out.images, references=refs, prompts=prompt):
                results.append((out.setting, m.name, value, len(out.images), out.seconds))
            for m, value in measure(self.style(group, refs[:16], mimic.resolution), out.images, style=group):
                results.append((out.setting, m.name, value, len(out.images), out.seconds))
            samples = {k: img for k, img in zip(keys, out.images)}
            if self.ev.save_images:
                adapter.save_generated(self.store, cell, group, out, mimic)
        else:
            outputs = adapter.run_per_image(mimic, cell.scenario, images, keys, cell.source.id, prompts, metas)
            for out in outputs:
                refs = [originals[k] for k in out.keys]
                for m in self.metrics.paired:
                    results.append((out.setting, f"{m.name}_ref", m(out.images, refs), len(out.keys), out.seconds))
            if outputs:
                last = outputs[-1]  # the strongest setting: what the sample grids show
                samples = dict(zip(last.keys, last.images))
        return results, samples
