"""What a sample brings into `mimicshield protect`, and the whole-run failures, through the CLI and Ray.

- Prompts: a sample's JSON ``prompt``, else its ``caption``, else its ``.txt`` member, else ``--prompt``.
  Checked by value: each written image equals the one `Protector` makes with that prompt (the same
  seed and key), and differs from the one it makes with the fallback prompt.
- ``--target``: a textural method pulls toward the given image, not the built-in pattern.
- Warnings reach ``protect_metrics``; JSON metadata that is not an object is kept untouched.
- Whole-run failures exit non-zero with one message: bad credentials, empty input, OUTPUT equal to
  INPUT (unreadable shards: test_archive_inputs.py). OUTPUT inside INPUT works and never
  protects its own outputs.
"""

from __future__ import annotations

import json

import boto3
import numpy as np
import pytest
from helpers import table_rows, tar_samples
from PIL import Image

from pipeline.cli import main
from pipeline.io.images import decode_image
from pipeline.io.sample_data import photo_samples, png_bytes, shard_bytes
from pipeline.protect import ProtectConfig, build_protector

pytestmark = pytest.mark.slow
EPS = 8
FAST = ["--model", "tiny", "--steps", "2", "--eps", str(EPS), "--step-size", "2", "--device", "cpu", "--batch-size",
        "3", "--no-progress", "--seed", "4"]
FALLBACK = "a portrait photo"


def differing(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of the values that differ."""
    return float(np.mean(a != b))


def expected_pixels(models, rgb: np.ndarray, key: str, prompt: str, **config) -> np.ndarray:
    """What the written file must hold: clean + round(delta) of `Protector` with this prompt and key."""
    cfg = ProtectConfig(**{"method": "sds-", "eps": EPS, "steps": 2, "step_size": 2, "seed": 4, **config})
    (delta,) = build_protector(models, cfg).protect([rgb], keys=[key], prompts=[prompt])
    return np.clip(rgb.astype(np.int64) + np.rint(delta).astype(np.int64), 0, 255)


def test_prompts_from_metadata_txt_and_fallback(ray_local, tiny_models, tmp_path, capsys):
    base = photo_samples(6)
    samples = [
        {"__key__": "s-prompt", "png": base[0]["png"],
         "json": json.dumps({"prompt": "a castle at night", "caption": "not this one"}).encode()},
        {"__key__": "s-caption", "png": base[1]["png"], "json": json.dumps({"caption": "an anime picture"}).encode()},
        {"__key__": "s-txt", "png": base[2]["png"], "json": json.dumps({"artist": "A"}).encode(),
         "txt": b"a watercolour landscape\n"},
        {"__key__": "s-none", "png": base[3]["png"]},
        {"__key__": "s-list", "png": base[4]["png"], "json": b"[1, 2, 3]"},  # JSON, but not an object
        {"__key__": "s-jpeg", "jpg": png_bytes(decode_image(base[5]["png"]).rgb, "JPEG")},
    ]
    prompts = {"s-prompt": "a castle at night", "s-caption": "an anime picture", "s-txt": "a watercolour landscape",
               "s-none": FALLBACK, "s-list": FALLBACK}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "shard-000000.tar").write_bytes(shard_bytes(samples))
    code = main(["protect", str(tmp_path / "in"), str(tmp_path / "out"), *FAST, "--prompt", FALLBACK])
    out = capsys.readouterr()
    assert code == 0, out.err

    written = tar_samples((tmp_path / "out" / "shard-000000.tar").read_bytes())
    assert sorted(written) == sorted(s["__key__"] for s in samples)
    for sample in samples[:5]:
        key = sample["__key__"]
        clean = decode_image(sample["png"]).rgb
        got = decode_image(written[key]["png"]).rgb.astype(np.int64)
        want = expected_pixels(tiny_models, clean, key, prompts[key])
        # equal up to a rare sign flip of a near-zero gradient (the actor runs torch on other threads)
        assert differing(got, want) <= 0.002, f"{key}: not protected with {prompts[key]!r}"
        if prompts[key] != FALLBACK:  # the prompt really changes the result, so the check above can fail
            other = differing(got, expected_pixels(tiny_models, clean, key, FALLBACK))
            assert other > 0.01, f"{key}: {other:.4f} of the pixels depend on the prompt"

    # metadata: kept, with the parameters added; a non-object JSON is kept as it was, parameters beside it
    assert json.loads(written["s-prompt"]["json"])["prompt"] == "a castle at night"
    assert json.loads(written["s-txt"]["json"])["mimicshield"]["method"] == "sds-"
    assert written["s-txt"]["txt"] == b"a watercolour landscape\n"
    assert written["s-list"]["json"] == b"[1, 2, 3]"
    assert json.loads(written["s-list"]["mimicshield.json"])["mimicshield"]["eps"] == EPS
    assert "json" in written["s-none"] and json.loads(written["s-none"]["json"])["mimicshield"]["seed"] == 4

    metrics = {r["key"]: r for r in table_rows(tmp_path / "out", "protect_metrics")}
    assert "JPEG" in (metrics["s-jpeg"]["warnings"] or "")
    assert all(metrics[k]["warnings"] is None for k in prompts)
    assert written["s-jpeg"].keys() >= {"jpg"}


def test_target_image_is_used_by_textural_methods(ray_local, tiny_models, tmp_path, photos, capsys):
    clean = np.asarray(Image.fromarray(photos["coffee"]).resize((64, 48)))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cup.png").write_bytes(png_bytes(clean))
    target = tmp_path / "target.png"
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255
    target.write_bytes(png_bytes(stripes))
    code = main(["protect", str(tmp_path / "in"), str(tmp_path / "out"), *FAST, "--method", "photoguard",
                 "--target", str(target)])
    assert code == 0, capsys.readouterr().err
    got = decode_image((tmp_path / "out" / "cup.png").read_bytes()).rgb.astype(np.int64)
    want = expected_pixels(tiny_models, clean, "cup", "a photo", method="photoguard", target=str(target))
    assert differing(got, want) <= 0.002
    default = expected_pixels(tiny_models, clean, "cup", "a photo", method="photoguard")
    assert differing(got, default) > 0.01  # the target matters
    (run,) = table_rows(tmp_path / "out", "runs")
    assert json.loads(run["config"])["protect"]["target"] == str(target)


# --------------------------------------------------------------------------- whole-run failures


def test_bad_s3_credentials_fail_fast_without_printing_them(s3_server, s3_bucket, tmp_path, capsys, monkeypatch):
    boto3.client("s3", **s3_server).put_object(Bucket=s3_bucket, Key="in/shard-000000.tar",
                                               Body=shard_bytes(photo_samples(1)))
    from moto import settings as moto_settings

    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the loopback server now checks keys
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-never-printed")
    code = main(["protect", f"s3://{s3_bucket}/in/", str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "wrong-secret-never-printed" not in err and err.count("\n") <= 2
    assert "access denied" in err and "check the S3 credentials" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["empty folder", "empty shard folder", "missing folder"])
def test_empty_or_missing_input_fails_fast(layout, tmp_path, capsys):
    src = tmp_path / "in"
    if layout != "missing folder":
        src.mkdir()
        (src / "notes.txt").write_text("no images here")
    if layout == "empty shard folder":
        (src / "tables").mkdir()
    code = main(["protect", str(src), str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert f"INPUT {src}: " in err and err.count("\n") == 1
    assert ("does not exist" if layout == "missing folder" else "holds no images or shards") in err
    assert not (tmp_path / "out").exists()


def test_output_equal_to_input_is_refused(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png_bytes(np.zeros((16, 16, 3), np.uint8)))
    code = main(["protect", str(tmp_path / "in"), str(tmp_path / "in/"), *FAST])
    assert code == 2 and f"OUTPUT {tmp_path / 'in'}: is the same folder as INPUT" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.png"]


def test_output_inside_input_never_protects_its_own_outputs(ray_local, tmp_path, capsys):
    src = tmp_path / "art"
    src.mkdir()
    for s in photo_samples(2):
        (src / f"{s['__key__']}.png").write_bytes(s["png"])
    for attempt in range(2):  # the second run must still see only the two originals
        code = main(["protect", str(src), str(src / "protected"), *FAST])
        out = capsys.readouterr()
        assert code == 0, out.err
        if attempt == 0:
            assert "2 samples in, 2 protected" in out.out
        else:  # its own outputs joined the input listing: the chunk would change and be redone
            assert "1 of 1 units already done" in out.err and "0 samples in" in out.out
    keys = sorted(r["key"] for r in table_rows(src / "protected", "protect_metrics"))
    assert keys == ["img00000", "img00001"]
    assert sorted(p.name for p in (src / "protected").glob("*.png")) == ["img00000.png", "img00001.png"]
    assert not (src / "protected" / "protected").exists()
