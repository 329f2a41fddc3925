"""Protect a local folder on one machine, without Ray (the first, single-machine front end)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from .models import load_models
from .protect import ProtectConfig, build_protector
from .protect.batch import protect_encoded

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def list_images(root: Path) -> list[Path]:
    """Every file under `root` with an image suffix, in a stable order."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def output_path(path: Path, ext: str) -> Path:
    """Same name, unless the format had to change (e.g. GIF written as PNG)."""
    same = path.suffix.lower().lstrip(".") in ({ext, "jpeg"} if ext == "jpg" else {ext, "tiff"} if ext == "tif" else {ext})
    return path if same else path.with_suffix(path.suffix + "." + ext)


def protect_folder(
    input_dir: str,
    output_dir: str,
    config: ProtectConfig,
    model: str = "tiny",
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 4,
    revision: str | None = None,
) -> str:
    """Protect every image under `input_dir` into `output_dir`; returns a summary line."""
    src, dst = Path(input_dir), Path(output_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"input folder not found: {src}")
    files = list_images(src)
    models = load_models(model, device=device, dtype=dtype, revision=revision)
    protector = build_protector(models, config)
    dst.mkdir(parents=True, exist_ok=True)
    rows, errors, start = [], [], time.perf_counter()
    with tqdm(total=len(files), unit="img", desc=f"protect {config.method}") as bar:
        for b in range(0, len(files), batch_size):
            chunk = files[b : b + batch_size]
            keys = [str(p.relative_to(src)) for p in chunk]
            datas = []
            for p in chunk:
                try:
                    datas.append(p.read_bytes())
                except OSError:
                    datas.append(b"")
            for path, res in zip(chunk, protect_encoded(protector, keys, datas)):
                if res.error:
                    errors.append({"key": res.key, "source": str(path), "stage": res.stage, "reason": res.error})
                    continue
                out = output_path(dst / res.key, res.ext)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(res.data)
                rows.append({"key": res.key, "output": str(out.relative_to(dst)), "method": config.method,
                             "eps": config.eps, "steps": config.steps, "model": model,
                             "device": str(models.device), **res.metrics, "warnings": "; ".join(res.warnings)})
            bar.update(len(chunk))
    elapsed = time.perf_counter() - start
    table = pd.DataFrame(rows)
    table.to_parquet(dst / "metrics.parquet", index=False)
    table.to_csv(dst / "metrics.csv", index=False)
    pd.DataFrame(errors, columns=["key", "source", "stage", "reason"]).to_csv(dst / "errors.csv", index=False)
    return (
        f"{len(files)} images in, {len(rows)} protected, {len(errors)} errors "
        f"({len(files) / max(elapsed, 1e-9):.2f} img/s); outputs in {dst}"
        + (f"; reasons in {dst / 'errors.csv'}" if errors else "")
    )
