"""Bad and unusual inputs: each is protected correctly or reported with a reason; none is lost.

Two levels:
- `protect_encoded`, the unit every front end calls: one batch holding every awkward case;
- `mimicshield protect IN OUT` on a folder (through Ray), where every input file must end up
  either written under its relative name or in the errors table.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import image_file, png_16bit_rgb
from PIL import Image

from pipeline.io.images import decode_image
from pipeline.protect import ProtectConfig, build_protector
from pipeline.protect.encoded import protect_encoded

EPS = 8
ORIENTATION = 0x0112


def photo(h: int = 48, w: int = 40) -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((w, h), Image.Resampling.LANCZOS))


def awkward_inputs() -> dict[str, bytes]:
    """name -> file bytes, one for each case the issue lists (and a few more)."""
    rgb = photo()
    good_png = image_file(Image.fromarray(rgb), "PNG")
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # rotate 90 degrees on display
    gray16 = (photo()[..., 0].astype(np.uint16) * 257 + np.arange(40, dtype=np.uint16)[None, :]).astype(np.uint16)
    return {
        "good.png": good_png,
        "garbage.png": b"\x89PNG but really just garbage bytes" * 8,
        "empty.png": b"",  # e.g. what an unreadable file yields
        "truncated.png": good_png[: len(good_png) // 2],
        "gray16.png": image_file(Image.fromarray(gray16), "PNG"),
        "rgb16.png": png_16bit_rgb(rgb.astype(np.uint16) * 257),
        "cmyk.jpg": image_file(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
        "palette_alpha.png": image_file(
            Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG", transparency=3
        ),
        "rotated.jpg": image_file(Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes()),
        "one_pixel.png": image_file(Image.fromarray(rgb[:1, :1]), "PNG"),
        "gray.png": image_file(Image.fromarray(rgb).convert("L"), "PNG"),
        "rgba.webp": image_file(Image.fromarray(rgb).convert("RGBA"), "WEBP", lossless=True),
    }


EXPECTED_ERRORS = {"garbage.png": "not an image", "empty.png": "empty", "truncated.png": "truncated"}


def diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


def check_protected(name: str, source: bytes, written: bytes) -> None:
    """Size, mode/format, orientation and budget of one protected file against its source."""
    src_img, out_img = Image.open(io.BytesIO(source)), Image.open(io.BytesIO(written))
    src, out = decode_image(source), decode_image(written)
    assert out_img.size == src_img.size, name
    assert out_img.format == src_img.format or (src.mode == "CMYK" and out_img.format == "PNG"), name  # io/jpeg.py
    assert out.mode == src.output_mode, name
    assert diff(out.rgb, src.rgb) <= EPS, name  # JPEG too: its own coefficients plus the perturbation's (io/jpeg.py)
    if src_img.format != "JPEG":  # (a JPEG's quantisation may keep none of a tiny image's perturbation)
        assert diff(out.rgb, src.rgb) > 0 or min(src.size) == 1, name
    if src.alpha is not None:
        np.testing.assert_array_equal(out.alpha, src.alpha, err_msg=name)
    if src.gray16 is not None:
        assert out_img.mode.startswith("I"), name
        assert diff(out.gray16, src.gray16) <= EPS * 257, name
    if src_img.getexif().get(ORIENTATION):
        assert out_img.getexif().get(ORIENTATION) == src_img.getexif().get(ORIENTATION), name


# --------------------------------------------------------------------------- protect_encoded


@pytest.fixture(scope="module")
def protector(tiny_models):
    return build_protector(tiny_models, ProtectConfig(method="sds-", eps=EPS, step_size=2, steps=2))


@pytest.mark.mutation
def test_every_awkward_input_protected_or_reported(protector):
    inputs = awkward_inputs()
    names = list(inputs)
    results = protect_encoded(protector, names, [inputs[n] for n in names])
    assert [r.key for r in results] == names  # one result per input, in order
    for name, res in zip(names, results):
        if name in EXPECTED_ERRORS:
            assert res.data is None and res.stage == "decode", name
            assert EXPECTED_ERRORS[name] in res.error, (name, res.error)
            continue
        assert res.error is None, (name, res.error)
        check_protected(name, inputs[name], res.data)
        assert (res.metrics["width"], res.metrics["height"]) == Image.open(io.BytesIO(inputs[name])).size
        assert res.metrics["linf"] <= EPS


@pytest.mark.mutation
def test_reasons_and_warnings(protector):
    inputs = awkward_inputs()
    names = ["cmyk.jpg", "rotated.jpg", "one_pixel.png", "palette_alpha.png", "rgb16.png", "gray16.png"]
    res = {r.key: r for r in protect_encoded(protector, names, [inputs[n] for n in names])}
    assert any("JPEG" in w for w in res["rotated.jpg"].warnings)
    assert any("CMYK" in w for w in res["cmyk.jpg"].warnings)
    assert any("RGBA" in w for w in res["palette_alpha.png"].warnings)
    assert any("16-bit" in w for w in res["rgb16.png"].warnings)  # depth lost: said, not silent
    assert not res["gray16.png"].warnings  # 16-bit grayscale is written as 16-bit
    assert math.isnan(res["one_pixel.png"].metrics["ssim"])  # too small for SSIM's window: NaN, not a crash
    assert Image.open(io.BytesIO(res["rotated.jpg"].data)).size == (40, 48)  # stored size, not rotated


@pytest.mark.mutation
def test_only_bad_inputs(protector):
    results = protect_encoded(protector, ["a", "b"], [b"", b"nope"])
    assert [r.stage for r in results] == ["decode", "decode"]


@pytest.mark.mutation
def test_oversized_image_refused_with_reason(protector):
    data = image_file(Image.fromarray(photo()), "PNG")
    (res,) = protect_encoded(protector, ["big"], [data], max_pixels=100)
    assert res.data is None and "too large" in res.error


# --------------------------------------------------------------------------- the CLI on a folder


def read_table(root: Path, name: str) -> list[dict]:
    files = sorted((root / "tables" / name).glob("*.parquet"))
    assert files, f"no {name} table under {root / 'tables' / name}"
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def test_cli_folder_accounts_for_every_file(ray_local, tmp_path, capsys):
    from pipeline.cli import main

    src, dst = tmp_path / "in", tmp_path / "out"
    (src / "nested" / "deeper").mkdir(parents=True)
    inputs = awkward_inputs()
    rel_names = []
    for i, (name, data) in enumerate(inputs.items()):
        rel = f"nested/{name}" if i % 3 == 1 else f"nested/deeper/{name}" if i % 3 == 2 else name
        (src / rel).write_bytes(data)
        rel_names.append(rel)
    # not image files: a directory with an image suffix, a non-image file
    (src / "folder.png").mkdir()
    (src / "README.txt").write_text("not an image")

    code = main([
        "protect", str(src), str(dst), "--model", "tiny", "--method", "sds-", "--steps", "2", "--eps", str(EPS),
        "--step-size", "2", "--device", "cpu", "--batch-size", "4", "--no-progress",
    ])
    out = capsys.readouterr()
    assert code == 0, out.err
    n_bad = len(EXPECTED_ERRORS)
    assert f"{len(inputs)} samples in, {len(inputs) - n_bad} protected, {n_bad} errors" in out.out

    metrics, errors = read_table(dst, "protect_metrics"), read_table(dst, "errors")
    keys = {rel.rsplit(".", 1)[0]: rel for rel in rel_names}
    assert sorted([r["key"] for r in metrics] + [r["key"] for r in errors]) == sorted(keys)  # all, once
    for row in errors:
        name = os.path.basename(keys[row["key"]])
        assert name in EXPECTED_ERRORS and EXPECTED_ERRORS[name] in row["reason"], row
        assert not (dst / keys[row["key"]]).exists()
    for row in metrics:
        rel = keys[row["key"]]
        # same relative name and suffix; a CMYK JPEG is written as PNG (io/jpeg.py), its suffix says so
        written = dst / (rel[: -len(".jpg")] + ".png" if row["format"] == "png" and rel.endswith(".jpg") else rel)
        assert written.is_file(), rel
        assert not (row["format"] == "png" and rel.endswith(".jpg")) or os.path.basename(rel) == "cmyk.jpg", rel
        check_protected(rel, (src / rel).read_bytes(), written.read_bytes())
        assert row["linf"] <= EPS
    assert not (dst / "folder.png").exists() and not (dst / "README.txt").exists()
