"""Messy archives through `mimicshield protect` and Ray (issue 12): nothing unprotected escapes, one bad
shard never stops an archive, every input sample is accounted for (written or an error row).

One CLI run per scenario, several bad inputs each (the pure rules are in test_webdataset.py):

- shards: a sample with three image members (``.PNG``, ``thumb.JPG``, a suffix-less PNG by content),
  ``.pkl`` and invalid-UTF-8 ``.json`` passed byte-exact; ``..``/absolute names, a link member, a
  split key, a bad second image -> error rows; a 120-character key written; ``1e999`` JSON kept
  byte-exact; a ``.tar.gz`` shard written back compressed with its JPEG tables; truncated, empty and
  not-a-tar shards -> one errors row each, exit code 3, no traceback; the rerun retries only those
  (with --on-bad-shard fail: stops at the first, exit 3); other settings into the same OUTPUT are
  refused (naming them) unless --overwrite.
- folders: ``a.png`` + ``a.jpg`` two keys, a dangling symlink an error row, tRNS transparency kept,
  ``--jpeg-as png``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import image_file, table_rows
from PIL import Image

from pipeline.cli import main
from pipeline.io.sample_data import photo_samples

pytestmark = pytest.mark.slow
EPS = 8
FAST = ["--model", "tiny", "--steps", "2", "--eps", str(EPS), "--step-size", "2", "--device", "cpu", "--batch-size",
        "4", "--no-progress", "--seed", "1"]


def tar_file(entries: list) -> bytes:
    """A tar of (name, bytes) members and ready TarInfos (links), in this order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tar.addfile(e)
                continue
            info = tarfile.TarInfo(e[0])
            info.size = len(e[1])
            tar.addfile(info, io.BytesIO(e[1]))
    return buf.getvalue()


def members_of(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_messy_shards_nothing_unprotected_nothing_lost(ray_local, tmp_path, capsys):
    rgbs = [np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")) for s in photo_samples(4)]
    png, thumb, preview = image_file(rgbs[0], "PNG"), image_file(rgbs[1], "JPEG", quality=90), image_file(rgbs[2], "PNG")
    bad_utf8 = b'{"caption": "caf\xe9"}'  # Latin-1 bytes, not UTF-8
    long_key = "L" * 120
    link = tarfile.TarInfo("link.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    shard0 = tar_file([
        ("multi.PNG", png), ("multi.json", bad_utf8), ("multi.pkl", b"\x80\x04never unpickled"),
        ("multi.preview", preview), ("multi.thumb.JPG", thumb),
        ("../evil.png", png), ("/abs.png", png), link,
        ("split.png", png), ("other.png", preview), ("split.json", b"{}"),
        (f"{long_key}.png", png), (f"{long_key}.json", b'{"big": 1e999}'),
        ("badthumb.png", png), ("badthumb.thumb.png", b"\x89PNG truncated"),
    ])
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "shard-000000.tar").write_bytes(shard0)
    (src / "shard-000001.tar").write_bytes(shard0[:3000])  # truncated
    (src / "shard-000002.tar").write_bytes(b"")  # zero bytes
    gz_jpeg = image_file(rgbs[3], "JPEG", quality=70, subsampling=2)
    (src / "shard-000003.tar.gz").write_bytes(gzip.compress(tar_file([("gz.jpg", gz_jpeg)])))
    (src / "shard-000004.tar").write_bytes(b"this is not a tar archive at all" * 64)

    code = main(["protect", str(src), str(dst), *FAST])
    out = capsys.readouterr()
    assert code == 3, out.err
    assert "Traceback" not in out.err + out.out
    for bad in ("shard-000001.tar", "shard-000002.tar", "shard-000004.tar"):  # one line each, naming it
        assert len([line for line in out.err.splitlines() if bad in line]) == 1, out.err
        assert not (dst / bad).exists()
    assert "3 shard(s) could not be read" in out.out and "error(s):" in out.out

    written = members_of(dst / "shard-000000.tar")
    assert not any(n.startswith("/") or ".." in n.split("/") for n in written)
    assert sorted(written) == sorted([
        "multi.PNG", "multi.json", "multi.mimicshield.json", "multi.pkl", "multi.preview", "multi.thumb.JPG",
        "other.png", "other.json", f"{long_key}.png", f"{long_key}.json", f"{long_key}.mimicshield.json",
    ])
    assert written["multi.json"] == bad_utf8 and written["multi.pkl"] == b"\x80\x04never unpickled"
    assert written[f"{long_key}.json"] == b'{"big": 1e999}'  # not JSON we may rewrite: kept byte-exact
    params = json.loads(written["multi.mimicshield.json"])["mimicshield"]
    assert params["eps"] == EPS
    for name, clean in (("multi.PNG", png), ("multi.preview", preview), ("multi.thumb.JPG", thumb)):
        diff = np.abs(pixels(written[name]) - pixels(clean))
        assert diff.max() > 0, name  # every image member protected
        assert Image.open(io.BytesIO(written[name])).format == Image.open(io.BytesIO(clean)).format
        if name != "multi.thumb.JPG":
            assert diff.max() <= EPS
    json.loads(written["other.json"])  # strict JSON we wrote

    gz = dst / "shard-000003.tar.gz"
    assert gz.read_bytes()[:2] == b"\x1f\x8b"
    gz_out = Image.open(io.BytesIO(members_of(gz)["gz.jpg"]))
    assert gz_out.quantization == Image.open(io.BytesIO(gz_jpeg)).quantization  # the source's tables

    metrics, errors = table_rows(dst, "protect_metrics"), table_rows(dst, "errors")
    by_key = {}
    for r in metrics:
        by_key.setdefault(r["key"], []).append(r["format"])
    assert sorted(by_key["multi"]) == ["PNG", "preview", "thumb.JPG"]
    shard_errors = sorted(r["source"] for r in errors if r["key"] == "")
    assert [os.path.basename(s) for s in shard_errors] == ["shard-000001.tar", "shard-000002.tar", "shard-000004.tar"]
    assert all(r["stage"] == "read" for r in errors if r["key"] == "")
    sample_errors = {r["key"]: r["reason"] for r in errors if r["key"]}
    assert set(sample_errors) == {"../evil", "/abs", "link", "split", "badthumb"}
    assert "link" in sample_errors["link"] and "adjacent" in sample_errors["split"]
    inputs = {"multi", "../evil", "/abs", "link", "split", "other", long_key, "badthumb", "gz"}
    assert set(by_key) | set(sample_errors) == inputs and not set(by_key) & set(sample_errors)  # each once
    gz_row = next(r for r in metrics if r["key"] == "gz")
    if gz_row["linf"] > EPS:  # reported honestly, in the table and on the terminal
        assert "exceed the budget after compression" in out.out and "exceeds the budget" in gz_row["warnings"]
    (run,) = table_rows(dst, "runs")
    assert run["shards_failed"] == 3 and run["status"] == "completed"

    # the rerun retries only what failed (shard 1 repaired; 2 and 4 still bad), here with --on-bad-shard
    # fail: shard 1 is committed, the run stops at shard 2 (exit 3, one line), nothing done is redone
    kept = (dst / "shard-000000.tar").stat().st_mtime_ns
    (src / "shard-000001.tar").write_bytes(tar_file([("fixed.png", png)]))
    code = main(["protect", str(src), str(dst), *FAST, "--on-bad-shard", "fail"])
    out = capsys.readouterr()
    assert code == 3 and "Traceback" not in out.err
    assert out.err.count("mimicshield: error") == 1 and "shard-000002.tar" in out.err
    assert (dst / "shard-000000.tar").stat().st_mtime_ns == kept
    assert sorted(members_of(dst / "shard-000001.tar")) == ["fixed.json", "fixed.png"]
    second = max(table_rows(dst, "runs"), key=lambda r: r["started_at"])
    assert second["status"] == "failed" and "shard-000002.tar" in second["failure"]
    assert (second["units_skipped"], second["units_done"], second["shards_failed"]) == (2, 1, 1)
    assert [os.path.basename(r["source"]) for r in table_rows(dst, "errors") if r["key"] == ""] == [
        "shard-000002.tar", "shard-000004.tar"]  # the repaired shard's read error is gone

    # other settings into the same OUTPUT: refused, naming what differs (no Ray needed)
    code = main(["protect", str(src), str(dst), *FAST, "--eps", "4", "--steps", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "eps: 8.0 -> 4.0" in err and "steps: 2 -> 3" in err and "--overwrite" in err
    from pipeline.batch.driver import preflight
    from pipeline.commands.protect import parse_settings

    plan = preflight(parse_settings([str(src), str(dst), *FAST, "--eps", "4", "--overwrite"]))
    assert plan.done == set()  # --overwrite: everything is reprocessed


def test_folder_same_stems_dangling_link_transparency_jpeg_as_png(ray_local, tmp_path, capsys):
    rgbs = [np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")) for s in photo_samples(3)]
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(image_file(rgbs[0], "PNG"))
    (src / "a.jpg").write_bytes(image_file(rgbs[1], "JPEG", quality=90))
    (src / "b.JPG").write_bytes(image_file(rgbs[2], "JPEG", quality=90))
    key_colour = tuple(int(v) for v in rgbs[0][0, 0])
    (src / "keyed.png").write_bytes(image_file(rgbs[0], "PNG", transparency=key_colour))
    os.symlink(src / "gone.png", src / "dangling.png")

    code = main(["protect", str(src), str(dst), *FAST, "--jpeg-as", "png"])
    out = capsys.readouterr()
    assert code == 0, out.err
    metrics, errors = table_rows(dst, "protect_metrics"), table_rows(dst, "errors")
    assert sorted(r["key"] for r in metrics) == ["a.jpg", "a.png", "b", "keyed"]
    assert [(r["key"], r["stage"]) for r in errors] == [("dangling", "read")]
    assert sorted(p.name for p in dst.iterdir() if p.is_file()) == ["a.jpg.png", "a.png", "b.png", "keyed.png"]
    assert all(r["linf"] <= EPS and r["format"] == "png" for r in metrics)  # PNG for JPEG inputs: exact budget
    keyed = np.asarray(Image.open(dst / "keyed.png"))
    transparent = np.all(rgbs[0] == np.array(key_colour), axis=-1)
    assert keyed.shape[-1] == 4 and np.all(keyed[..., 3][transparent] == 0) and np.all(keyed[..., 3][~transparent] == 255)
