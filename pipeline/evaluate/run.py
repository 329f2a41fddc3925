"""The Ray evaluation stage: mimic protected images and their clean originals, measure the gap.

    read_samples(PROTECTED) --+
                              +-- union, groupby(key) (inner join) --> annotate (group, method, eps, run, prompt)
    read_samples(CLEAN) ------+        |
                                       +--> PairEvaluator actors (map_batches, ActorPoolStrategy;
                                       |    SDEdit/inpaint models and metric backbones loaded once
                                       |    per actor; one GPU each when the cluster has GPUs)
                                       |    -> per-image metric rows -> groupby + mean
                                       +--> GroupTrainer actors (groupby(group).map_groups;
                                            textual inversion / LoRA trained per group, once on the
                                            protected and once on the clean images)
                                            -> per-group metric rows
    rows -> OUTPUT/tables/mimicry_metrics/<evaluation id>.parquet (schemas/mimicry_metrics.json)
    settings -> OUTPUT/evaluations/<evaluation id>.json (every option, no credentials)
    sample grids -> OUTPUT/samples/<scenario>/<group>/<key>.png + .json (what the report shows)
    trained mimics -> OUTPUT/mimics/<scenario>/<run>/<group>/<protected|clean>/ (safetensors; DreamBooth's
                      UNet with its config.json, a directory `from_pretrained` loads)

OUTPUT may be local or s3://. Every metric row is computed twice where it makes sense: for the
protected inputs (method and eps from the samples' ``mimicshield`` metadata) and for the clean
inputs (method "none", eps 0), the baseline the protection is judged against.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.batch.progress import CountProgress
from pipeline.cluster.logs import quiet_data_context
from pipeline.cluster.pool import actor_share
from pipeline.cluster.session import ensure_ray
from pipeline.evaluate.mimic import (
    TRAINING_SCENARIOS,
    DreamBooth,
    Inpaint,
    Lora,
    SDEdit,
    TextualInversion,
)
from pipeline.evaluate.mimic.common import mimic_view
from pipeline.evaluate.mimic.textual_inversion import placeholder_token
from pipeline.evaluate.settings import EvalSettings
from pipeline.io.files import write_atomic
from pipeline.io.images import ImageError, center_crop_resize, decode_image
from pipeline.io.metadata import sample_group, sample_meta
from pipeline.io.paths import PathArg, check_paths
from pipeline.io.samples import read_samples
from pipeline.io.storage import InputError, split_uri, to_uri
from pipeline.io.tables import write_table
from pipeline.metrics.base import Metric, measure
from pipeline.metrics.mimicry import Metrics

TABLE = "mimicry_metrics"
GROUP_KEYS = ["run", "group", "scenario", "setting", "method", "eps", "metric", "calibrated"]
ROW_SCHEMA = pa.schema([
    ("run", pa.string()), ("group", pa.string()), ("scenario", pa.string()), ("setting", pa.string()),
    ("method", pa.string()), ("eps", pa.float64()), ("metric", pa.string()), ("value", pa.float64()),
    ("n_images", pa.int64()), ("calibrated", pa.bool_()), ("seconds", pa.float64()),
])


# ---------------------------------------------------------------------------- annotation


def annotate(batch: pa.Table, settings: EvalSettings) -> pa.Table:
    """Joined rows -> the columns the evaluators need: group, method, eps, run, prompt, group_id."""
    default_run = settings.run or posixpath.basename(settings.protected.rstrip("/")) or "run"
    rows = []
    for row in batch.to_pylist():
        p_meta, c_meta = sample_meta(row.get("p_meta")) or {}, sample_meta(row.get("c_meta")) or {}
        params = p_meta.get("mimicshield") if isinstance(p_meta.get("mimicshield"), dict) else {}
        group = (sample_group(row["key"], p_meta, settings.group_by)
                 or sample_group(row["key"], c_meta, settings.group_by))
        method = settings.method or params.get("method") or "unknown"
        eps = settings.eps if settings.eps is not None else params.get("eps")
        eps = float(eps) if isinstance(eps, (int, float)) else math.nan
        run = settings.run or params.get("run_id") or default_run
        group = "all" if group in (None, "") else str(group)
        prompt = row.get("p_prompt") or row.get("c_prompt") or settings.prompt  # io/metadata.sample_prompt
        rows.append({
            "key": row["key"], "p_image": row["p_image"], "c_image": row["c_image"],
            "meta": json.dumps({**c_meta, **{k: v for k, v in p_meta.items() if k != "mimicshield"}}),
            "group": group, "method": method, "eps": eps, "run": run, "prompt": str(prompt),
            "group_id": json.dumps([run, group, method, eps]),
        })
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("key", pa.string()), ("p_image", pa.binary()), ("c_image", pa.binary()), ("meta", pa.string()),
        ("group", pa.string()), ("method", pa.string()), ("eps", pa.float64()), ("run", pa.string()),
        ("prompt", pa.string()), ("group_id", pa.string()),
    ]))


def calibrated(metrics: Metrics, metric: str, random_mimic: bool) -> bool:
    """False when the metric's backbone is random or the mimic model is a built-in (a toy trained here, or random weights)."""
    base = metric.removesuffix("_pair").removesuffix("_ref")
    return bool(metrics.calibrated.get(base, False)) and not random_mimic


def _decode(data: bytes) -> np.ndarray:
    return decode_image(data).rgb


# ---------------------------------------------------------------------------- sample grids


def amplified_perturbation(clean: np.ndarray, protected: np.ndarray, gain: float | None = None) -> np.ndarray:
    """(protected - clean) * gain + 128, gain filling the 8-bit range (at most x10 of max |delta|)."""
    delta = protected.astype(np.float32) - clean.astype(np.float32)
    peak = float(np.abs(delta).max()) or 1.0
    gain = gain or min(127.0 / peak, 10.0 * 127.0 / 16.0)
    return np.clip(delta * gain + 128, 0, 255).astype(np.uint8)


def grid(rows: list[list[np.ndarray]], size: int = 256, pad: int = 2) -> np.ndarray:
    """Images (uint8 H x W x 3) as a grid of size x size cells on white."""
    n_cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (size + pad) + pad, n_cols * (size + pad) + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            y, x = pad + i * (size + pad), pad + j * (size + pad)
            out[y : y + size, x : x + size] = mimic_view(img, size)
    return out


CELL = 256  # px per grid cell: readable on a 1280 px page, three columns side by side


def mimic_input_words(resolution: int) -> str:
    """How a mimic prepares its input (mimic/common.py mimic_view), as a report caption says it."""
    return (f"the mimic sees {resolution} x {resolution} px: the shorter side resized to {resolution} px, then the "
            "centre square cropped (aspect kept)")


def pair_grid(clean: np.ndarray, prot: np.ndarray, resolution: int, outputs: list[tuple]) -> tuple[np.ndarray, dict]:
    """A mimic's sample grid, three full columns (clean | protected | amplified difference) per row.

    Rows: the inputs (centre square); the inputs as the mimic sees them (`resolution`, enlarged without
    smoothing); then per setting in `outputs` ((setting, mimic of clean, mimic of protected)) both outputs
    and their amplified difference. Returns the image and its description for the report.
    """
    def seen(rgb):  # at the mimic's resolution, each of its pixels a block in the cell
        view = mimic_view(rgb, resolution)
        return center_crop_resize(view, CELL, Image.NEAREST) if resolution < CELL else view

    pert = amplified_perturbation(clean, prot) if clean.shape == prot.shape else np.full_like(prot, 128)
    view_c, view_p = seen(clean), seen(prot)
    rows = [[clean, prot, pert], [view_c, view_p, amplified_perturbation(view_c, view_p)]]
    rows += [[seen(c), seen(p), amplified_perturbation(seen(c), seen(p))] for _, c, p in outputs]
    info = {"columns": ["clean", "protected", "difference, amplified"],
            "rows": ["input (centre square)", f"as the mimic sees it ({resolution} px)",
                     *(f"mimic output, {setting}" for setting, _, _ in outputs)],
            "mimic_resolution": resolution, "mimic_input": mimic_input_words(resolution), "cell_px": CELL}
    return grid(rows, CELL), info


def png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


class SampleWriter:
    """Writes sample grids (PNG + a JSON description) under OUTPUT/samples/, a few per group."""

    def __init__(self, output: str, s3, per_group: int):
        self.fs, self.root = split_uri(output, s3)
        self.per_group = per_group
        self.count: dict[tuple, int] = {}

    def wants(self, scenario: str, group: str) -> bool:
        return self.count.get((scenario, group), 0) < self.per_group

    def write(self, scenario: str, group: str, name: str, image: np.ndarray, info: dict) -> None:
        self.count[(scenario, group)] = self.count.get((scenario, group), 0) + 1
        safe = placeholder_token(name)[1:-1]
        folder = f"{self.root}/samples/{scenario}/{placeholder_token(group)[1:-1]}"
        write_atomic(self.fs, f"{folder}/{safe}.png", png(image))
        write_atomic(self.fs, f"{folder}/{safe}.json",
                     json.dumps({"scenario": scenario, "group": group, "name": name, **info}).encode())


# ---------------------------------------------------------------------------- per-image scenarios


class PairEvaluator:
    """Ray actor: visibility + SDEdit + inpainting for batches of (protected, clean) pairs.

    Emits one row per image, scenario, setting, source and metric; the driver averages them.
    """

    def __init__(self, settings: EvalSettings):
        self.s = settings
        self.metrics = Metrics(settings.metrics)
        self.builtin = settings.model.is_builtin
        self.mimics = {}
        if "sdedit" in settings.scenarios:
            self.mimics["sdedit"] = SDEdit(settings.model, settings.sdedit, settings.model.device, settings.model.dtype)
        if "inpaint" in settings.scenarios:
            spec = settings.inpaint_spec
            self.mimics["inpaint"] = Inpaint(spec, settings.inpaint, spec.device, spec.dtype)
        self.samples = SampleWriter(settings.output, settings.s3, settings.samples_per_group)

    def _calibrated(self, metric: str, mimic: bool) -> bool:
        return calibrated(self.metrics, metric, mimic and self.builtin)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict] = []
        pairs = []
        for r in batch.to_pylist():
            try:
                pairs.append((r, _decode(r["p_image"]), _decode(r["c_image"])))
            except ImageError:
                continue  # unreadable images were reported by protect; nothing to mimic here
        by_group: dict[str, list] = {}
        for item in pairs:
            by_group.setdefault(item[0]["group_id"], []).append(item)
        for items in by_group.values():
            rows += self._evaluate(items)
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)

    def _row(self, r, scenario, setting, metric, value, seconds, baseline=False, mimic=True) -> dict:
        return {"run": r["run"], "group": r["group"], "scenario": scenario, "setting": setting,
                "method": "none" if baseline else r["method"], "eps": 0.0 if baseline else r["eps"],
                "metric": metric, "value": float(value), "n_images": 1,
                "calibrated": self._calibrated(metric, mimic), "seconds": float(seconds)}

    def _evaluate(self, items) -> list[dict]:
        rows = []
        recs, prot, clean = (list(column) for column in zip(*items))
        keys = [r["key"] for r in recs]
        prompts = [r["prompt"] for r in recs]
        metas = [json.loads(r["meta"]) for r in recs]
        for r, p, c in zip(recs, prot, clean):
            if p.shape != c.shape:
                continue
            for metric in self.metrics.visibility:
                rows.append(self._row(r, "visibility", "inputs", metric.name, metric([p], [c]), 0.0, mimic=False))
        if not self.mimics:  # only training scenarios asked for: still show the inputs
            for r, p, c in zip(recs, prot, clean):
                if c.shape == p.shape and self.samples.wants("visibility", r["group"]):
                    self.samples.write("visibility", r["group"], r["key"], grid([[c, p, amplified_perturbation(c, p)]]), {
                        "key": r["key"], "run": r["run"], "method": r["method"], "eps": r["eps"],
                        "rows": ["input (centre square)"], "columns": ["clean", "protected", "difference, amplified"],
                        "cell_px": CELL})
        outputs = {}
        for scenario, mimic in self.mimics.items():
            kwargs = {"metas": metas} if scenario == "inpaint" else {}
            outputs[scenario] = {
                source: mimic.run(images, keys, source, prompts=prompts, **kwargs)
                for source, images in (("protected", prot), ("clean", clean))
            }
        for scenario, by_source in outputs.items():
            index = {k: i for i, k in enumerate(keys)}
            for out_p, out_c in zip(by_source["protected"], by_source["clean"]):
                per_image_p = out_p.seconds / max(1, len(out_p.keys))
                per_image_c = out_c.seconds / max(1, len(out_c.keys))
                for j, key in enumerate(out_p.keys):
                    r, c_img = recs[index[key]], clean[index[key]]
                    a, b = out_p.images[j], out_c.images[j]
                    for m in self.metrics.paired:
                        rows.append(self._row(r, scenario, out_p.setting, f"{m.name}_pair", m([a], [b]), per_image_p))
                    for m in self.metrics.paired:
                        rows.append(self._row(r, scenario, out_p.setting, f"{m.name}_ref", m([a], [c_img]),
                                              per_image_p))
                    for m in self.metrics.paired:
                        rows.append(self._row(r, scenario, out_c.setting, f"{m.name}_ref", m([b], [c_img]),
                                              per_image_c, baseline=True))
            self._write_samples(scenario, recs, prot, clean, by_source)
        return rows

    def _write_samples(self, scenario, recs, prot, clean, by_source) -> None:
        index = {r["key"]: i for i, r in enumerate(recs)}
        for i, r in enumerate(recs):
            if not self.samples.wants(scenario, r["group"]):
                continue
            outputs = []
            for out_p, out_c in zip(by_source["protected"], by_source["clean"]):
                if r["key"] in out_p.keys:
                    j = out_p.keys.index(r["key"])
                    outputs.append((out_p.setting, out_c.images[j], out_p.images[j]))
            if not outputs:
                continue
            c, p = clean[index[r["key"]]], prot[index[r["key"]]]
            image, info = pair_grid(c, p, self.mimics[scenario].resolution, outputs)
            self.samples.write(scenario, r["group"], r["key"], image, {
                "key": r["key"], "run": r["run"], "method": r["method"], "eps": r["eps"], **info})


PROGRESS = "_pairs"  # the scenario of the one row per batch that tells the driver's bar how many pairs it held


class CountedPairEvaluator(PairEvaluator):
    """PairEvaluator in the Ray stage: its rows, then one PROGRESS row (n_images: the batch's pairs)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        tick = {"run": "", "group": "", "scenario": PROGRESS, "setting": "", "method": "", "eps": math.nan,
                "metric": "", "value": 0.0, "n_images": batch.num_rows, "calibrated": False, "seconds": 0.0}
        return pa.concat_tables([super().__call__(batch), pa.Table.from_pylist([tick], schema=ROW_SCHEMA)])


def evaluate_pairs(pairs, settings: EvalSettings, opts: dict):
    """Run PairEvaluator over `pairs` with one bar of pairs (in a terminal); the per-image rows as a Dataset."""
    import pyarrow.compute as pc
    import ray.data

    tables = []
    with CountProgress(pairs.count(), "evaluating", "pair", enabled=None if settings.progress else False) as bar:
        for batch in pairs.map_batches(CountedPairEvaluator, fn_constructor_kwargs={"settings": settings},
                                       batch_size=settings.batch_size, batch_format="pyarrow",
                                       **opts).iter_batches(batch_size=None, batch_format="pyarrow"):
            ticks = pc.equal(batch["scenario"], PROGRESS)
            bar.add(int(pc.sum(pc.filter(batch["n_images"], ticks)).as_py() or 0))
            tables.append(batch.filter(pc.invert(ticks)))
    return ray.data.from_arrow(tables or [ROW_SCHEMA.empty_table()])


# ---------------------------------------------------------------------------- training scenarios


class GroupTrainer:
    """Ray actor: textual inversion, LoRA and DreamBooth, trained per group on protected and on clean images."""

    def __init__(self, settings: EvalSettings, style_references: dict[str, list[bytes]] | None = None):
        self.s = settings
        self.metrics = Metrics(settings.metrics)
        self.builtin = settings.model.is_builtin
        self.mimics = {}
        self.style_references = style_references or {}  # group (or reference style) -> encoded images
        self.style_metrics: dict[int, tuple[Metric, Metric]] = {}  # per mimic resolution
        device = settings.model.device
        if "textual_inversion" in settings.scenarios:
            self.mimics["textual_inversion"] = TextualInversion(settings.model, settings.textual_inversion, device)
        if "lora" in settings.scenarios:
            self.mimics["lora"] = Lora(settings.model, settings.lora, device)
        if "dreambooth" in settings.scenarios:
            self.mimics["dreambooth"] = DreamBooth(settings.model, settings.dreambooth, device)
        self.samples = SampleWriter(settings.output, settings.s3, 1)
        self.clean_cache: dict[tuple, object] = {}  # (scenario, group) -> clean-trained output

    def _calibrated(self, metric: str) -> bool:
        return calibrated(self.metrics, metric, self.builtin)

    def style(self, resolution: int) -> tuple[Metric, Metric]:
        """Style accuracy and distance among every group's clean images and the reference styles, at the mimic's
        size."""
        if resolution not in self.style_metrics:
            refs = {name: [_decode(b) for b in images] for name, images in self.style_references.items()}
            self.style_metrics[resolution] = self.metrics.style(refs, resolution)
        return self.style_metrics[resolution]

    def __call__(self, batch: pa.Table) -> pa.Table:
        recs, prot, clean = [], [], []
        for r in batch.to_pylist():
            try:
                p, c = _decode(r["p_image"]), _decode(r["c_image"])
            except ImageError:
                continue
            recs.append(r)
            prot.append(p)
            clean.append(c)
        if not recs:
            return pa.Table.from_pylist([], schema=ROW_SCHEMA)
        rows = []
        for scenario, mimic in self.mimics.items():
            rows += self._evaluate(scenario, mimic, recs, prot, clean)
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)

    def _evaluate(self, scenario, mimic, recs, prot, clean) -> list[dict]:
        r0 = recs[0]
        group = r0["group"]
        fs, root = split_uri(self.s.output, self.s.s3)
        outs = {}
        with tempfile.TemporaryDirectory(prefix="mimicshield-mimic-") as tmp:
            for source, images in (("protected", prot), ("clean", clean)):
                cache_key = (scenario, group)
                if source == "clean" and cache_key in self.clean_cache:
                    outs[source] = self.clean_cache[cache_key]
                    continue
                workdir = os.path.join(tmp, source)
                out, weights = mimic.run(images, group, source, workdir)
                outs[source] = out
                if source == "clean":
                    self.clean_cache[cache_key] = out
                dest = f"{root}/mimics/{scenario}/{r0['run']}/{mimic_slug(group)}/{source}"
                for file in sorted(Path(weights).parent.iterdir()):  # the weights and their config (DreamBooth)
                    if file.is_file():
                        write_atomic(fs, f"{dest}/{file.name}", local_file=str(file))
        # CLIP score against the prompt with the group's name in place of the learned token
        prompt = mimic.config.prompt_template.format(token=group)
        rows = []

        def row(metric, value, n, seconds, baseline=False):
            rows.append({"run": r0["run"], "group": group, "scenario": scenario, "setting": outs["protected"].setting,
                         "method": "none" if baseline else r0["method"], "eps": 0.0 if baseline else r0["eps"],
                         "metric": metric, "value": float(value), "n_images": int(n),
                         "calibrated": self._calibrated(metric), "seconds": float(seconds)})

        gen_p, gen_c = outs["protected"].images, outs["clean"].images
        for m in self.metrics.paired:
            row(f"{m.name}_pair", m(gen_p, gen_c), len(gen_p), outs["protected"].seconds)
        if group in self.style_references:  # the judge's candidates
            for source, gen in (("protected", gen_p), ("clean", gen_c)):
                for m, value in measure(self.style(mimic.resolution), gen, style=group):  # accuracy: 2+ candidates
                    row(m.name, value, len(gen), outs[source].seconds, baseline=source == "clean")
        if self.s.save_images:
            for source in ("protected", "clean"):
                save_generated(fs, root, scenario, r0, outs[source], mimic.config, source)
        for source, gen in (("protected", gen_p), ("clean", gen_c)):
            for m, value in measure(self.metrics.sets, gen, references=clean, prompts=prompt):
                row(m.name, value, len(gen), outs[source].seconds, baseline=source == "clean")
        n = min(4, len(clean), len(gen_c), len(gen_p))  # every row as long as the others: no empty cells
        self.samples.write(scenario, group, f"{r0['run']}-{r0['method']}-{r0['eps']:g}",
                           grid([clean[:n], gen_c[:n], gen_p[:n]]), {
            "key": None, "run": r0["run"], "method": r0["method"], "eps": r0["eps"],
            "rows": ["clean training images", "generated after training on clean images (same prompt and seeds "
                     "as the row below)", "generated after training on protected images"],
            "columns": [f"#{i}" for i in range(n)],
        })
        return rows


def mimic_slug(group: str) -> str:
    return placeholder_token(group)[1:-1]


def save_generated(fs, root: str, scenario: str, rec: dict, out, config, source: str) -> None:
    """A training mimic's generated images as PNG, with an index.json saying which prompt and seed made each:
    OUTPUT/generated/<scenario>/<run>/<group>/<method>-<eps>/<protected|clean>/<i>.png (clean-trained and
    protected-trained images of one group share prompts and seeds, so image i of each is a pair)."""
    protection = "none-0" if source == "clean" else f"{mimic_slug(rec['method'])}-{rec['eps']:g}"
    folder = f"{root}/generated/{scenario}/{mimic_slug(rec['run'])}/{mimic_slug(rec['group'])}/{protection}/{source}"
    write_generated(fs, folder, scenario, rec["group"], out, config,
                    {"run": rec["run"], "source": source, "method": "none" if source == "clean" else rec["method"],
                     "eps": 0.0 if source == "clean" else rec["eps"]})


def write_generated(fs, folder: str, scenario: str, group: str, out, config, fields: dict) -> None:
    """`out.images` as folder/<i>.png and folder/index.json: per image its file, group, prompt, seed, setting
    and `fields` (run, source, method, eps, purification: what the caller knows). The one writer of generated
    images: evaluate (`save_generated`) and the study's cells (`--save-images`) call it."""
    from pipeline.evaluate.mimic.common import mimic_seed

    token = placeholder_token(group) if scenario == "textual_inversion" else getattr(config, "token", "")
    prompt = config.prompt_template.format(token=token)
    index = []
    for i, image in enumerate(out.images):
        write_atomic(fs, f"{folder}/{i}.png", png(image))
        index.append({"file": f"{i}.png", "group": group, **fields, "prompt": prompt,
                      "seed": mimic_seed(config.seed, f"{scenario}/{group}/{i}"), "setting": out.setting})
    write_atomic(fs, f"{folder}/index.json", json.dumps(index, indent=1).encode())


def style_reference_images(pairs, settings: EvalSettings, per_group: int = 16) -> dict[str, list[bytes]]:
    """The style judge's candidates: up to `per_group` clean images of every group, plus the reference
    styles of ``--style-references`` (metrics/style.reference_styles; a group keeps its own images)."""
    from pipeline.metrics.style import merge_references, reference_styles

    def first(batch: pa.Table) -> pa.Table:
        return batch.slice(0, per_group).select(["group", "c_image"])

    extra = {name: [png(img) for img in images]
             for name, images in reference_styles(settings.metrics.style_references, settings.s3).items()}
    groups: dict[str, list[bytes]] = {}
    for r in pairs.groupby("group").map_groups(first, batch_format="pyarrow").take_all():
        groups.setdefault(r["group"], []).append(r["c_image"])
    return merge_references(extra, groups)


# ---------------------------------------------------------------------------- driver


def _tagged(ds, role: str):
    def tag(batch: pa.Table) -> pa.Table:
        return pa.table({"key": batch["key"], "role": pa.array([role] * len(batch), pa.string()),
                         "image": batch["image"], "meta": batch["meta"], "prompt": batch["prompt"]})

    return ds.map_batches(tag, batch_format="pyarrow")


PAIR_SCHEMA = pa.schema([("key", pa.string()), ("p_image", pa.binary()), ("p_meta", pa.string()),
                         ("p_prompt", pa.string()), ("c_image", pa.binary()), ("c_meta", pa.string()),
                         ("c_prompt", pa.string())])


def pair_by_key(group: pa.Table) -> pa.Table:
    """All rows of one key (from protected and clean) -> one joined row; a side without an image stays null."""
    rows = {r["role"]: r for r in group.to_pylist()}
    p, c = rows.get("p") or {}, rows.get("c") or {}
    key = (p or c)["key"]
    return pa.Table.from_pylist([{"key": key, "p_image": p.get("image"), "p_meta": p.get("meta"),
                                  "p_prompt": p.get("prompt"), "c_image": c.get("image"), "c_meta": c.get("meta"),
                                  "c_prompt": c.get("prompt")}], schema=PAIR_SCHEMA)


def one_sided(batch: pa.Table) -> pa.Table:
    """The joined rows missing their protected or their clean image: key and which side is there."""
    import pyarrow.compute as pc

    p_missing, c_missing = pc.is_null(batch["p_image"]), pc.is_null(batch["c_image"])
    side = pc.if_else(p_missing, pa.scalar("clean"), pa.scalar("protected"))
    mask = pc.or_(p_missing, c_missing)
    return pa.table({"key": pc.filter(batch["key"], mask), "side": pc.filter(side, mask)})


def both_sides(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.and_(pc.is_valid(batch["p_image"]), pc.is_valid(batch["c_image"])))


def actor_options(settings: EvalSettings) -> dict:
    """map_batches / map_groups options for the mimic actors: cluster/pool.py's rule."""
    return actor_share(settings.model.device, settings.actors).pool_options()


def build_pairs(settings: EvalSettings):
    """Protected and clean samples joined on key (a lazy Ray Dataset of PAIR_SCHEMA rows, one per key).

    Keys found on one side only keep a row with the other side null (see `one_sided`, `both_sides`).
    """
    prot = _tagged(read_samples(settings.protected, settings.s3), "p")
    clean = _tagged(read_samples(settings.clean, settings.s3), "c")
    # an inner join on key as a groupby (Dataset.join would need polars, not a dependency here)
    return prot.union(clean).groupby("key").map_groups(pair_by_key, batch_format="pyarrow")


def unmatched_keys(joined) -> dict[str, list[str]]:
    """{"protected": keys without a clean original, "clean": keys without a protected copy}, sorted."""
    out: dict[str, list[str]] = {"protected": [], "clean": []}
    for r in joined.map_batches(one_sided, batch_format="pyarrow").take_all():
        out[r["side"]].append(r["key"])
    return {side: sorted(keys) for side, keys in out.items()}


def describe_unmatched(unmatched: dict[str, list[str]]) -> str | None:
    """One line for the log about keys on only one side, or None when every key is paired."""
    parts = []
    for side, other in (("protected", "clean original"), ("clean", "protected copy")):
        keys = unmatched[side]
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            parts.append(f"{len(keys)} {side} sample(s) without a {other} ({shown})")
    return ("not evaluated: " + "; ".join(parts)) if parts else None


def aggregate(per_image) -> list[dict]:
    """Per-image rows -> one row per (run, group, scenario, setting, method, eps, metric)."""
    from ray.data.aggregate import Count, Mean, Sum

    if per_image.count() == 0:
        return []
    agg = per_image.groupby(GROUP_KEYS).aggregate(
        Mean("value", alias_name="value"), Count(alias_name="n_images"), Sum("seconds", alias_name="seconds"))
    rows = agg.take_all()
    return [{k: r[k] for k in ROW_SCHEMA.names} for r in rows]


@dataclass
class EvalSummary:
    evaluation_id: str
    table: str
    rows: int
    groups: int
    seconds: float
    samples: str

    def __str__(self) -> str:
        return (f"evaluation {self.evaluation_id}: {self.rows} metric rows for {self.groups} group(s) in "
                f"{self.seconds:.1f}s\n  table:   {self.table}\n  samples: {self.samples}")


def protection_from_runs(settings: EvalSettings) -> tuple[str | None, float | None]:
    """(method, eps) of the completed protect runs recorded under PROTECTED/tables/runs, when they agree.

    Folder outputs carry no per-sample metadata; this is where their protection parameters are.
    """
    import pyarrow.parquet as pq

    try:
        fs, root = split_uri(settings.protected, settings.s3)
        runs = pq.read_table(f"{root.rstrip('/')}/tables/runs", filesystem=fs).to_pylist()
    except Exception:  # no runs table (not written by `mimicshield protect`): nothing to learn
        return None, None
    params = {(r["method"], json.loads(r["config"]).get("protect", {}).get("eps")) for r in runs
              if r.get("status") == "completed" and r.get("config")}
    return next(iter(params)) if len(params) == 1 else (None, None)


def run_evaluation(settings: EvalSettings, log=print) -> EvalSummary:
    """Run every requested scenario over PROTECTED vs CLEAN; write the table; return a summary."""
    start = time.perf_counter()
    check_paths([PathArg("PROTECTED", settings.protected), PathArg("--clean", settings.clean)],
                PathArg("--output", settings.output), settings.s3)  # before Ray: each problem one line
    if settings.method is None or settings.eps is None:  # folder outputs: from the protect runs, when they agree
        method, eps = protection_from_runs(settings)
        settings = replace(settings, method=settings.method or method,
                           eps=settings.eps if settings.eps is not None else eps)
    settings.model.check()  # fail fast on the driver, not in every actor
    if "inpaint" in settings.scenarios:
        settings.inpaint_spec.check()
    ensure_ray(settings.address, settings.verbose)
    import ray.data

    quiet_data_context(ray.data.DataContext.get_current(), settings.verbose)  # as protect: no INFO lines, no operator bars
    opts = actor_options(settings)  # the resource plan: a pool that cannot run beside its tasks is refused here
    eval_id = f"eval-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    joined = build_pairs(settings).materialize()
    unmatched = unmatched_keys(joined)
    if describe_unmatched(unmatched):
        log(describe_unmatched(unmatched))
    pairs = joined.map_batches(both_sides, batch_format="pyarrow").map_batches(
        annotate, fn_kwargs={"settings": settings}, batch_format="pyarrow")
    training_wanted = any(s in settings.scenarios for s in TRAINING_SCENARIOS)
    pairs = pairs.materialize()
    if pairs.count() == 0:
        raise InputError(f"no sample of {settings.protected} has a clean original with the same key in "
                         f"{settings.clean}: nothing to evaluate")
    log(f"evaluating {pairs.count()} protected/clean pairs: {', '.join(settings.scenarios)}")
    rows: list[dict] = []
    rows += aggregate(evaluate_pairs(pairs, settings, opts))  # visibility rows always; sdedit / inpaint when asked for
    if training_wanted:
        references = style_reference_images(pairs, settings)
        trained = pairs.groupby("group_id").map_groups(
            GroupTrainer, fn_constructor_kwargs={"settings": settings, "style_references": references},
            batch_format="pyarrow", **opts)
        rows += [{k: r[k] for k in ROW_SCHEMA.names} for r in trained.take_all()]
    fs, root = split_uri(settings.output, settings.s3)
    rows.sort(key=lambda r: tuple(str(r[k]) for k in ("run", "group", "scenario", "setting", "method", "metric")))
    path = write_table(rows, TABLE, f"{root}/tables/{TABLE}", filesystem=fs, basename=eval_id)
    record = {**settings_record(settings), "unmatched": {side: {"count": len(keys), "keys": keys[:100]}
                                                         for side, keys in unmatched.items()}}
    write_atomic(fs, f"{root}/evaluations/{eval_id}.json", json.dumps(record, indent=1, default=str).encode())
    groups = len({(r["run"], r["group"]) for r in rows})
    return EvalSummary(eval_id, to_uri(fs, path), len(rows), groups, time.perf_counter() - start,
                       to_uri(fs, f"{root}/samples"))


def settings_record(settings: EvalSettings) -> dict:
    record = asdict(settings)
    record.pop("s3", None)  # never write credentials
    return record
