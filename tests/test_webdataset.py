"""Archive-grade input handling as pure functions, without Ray (fast; issue 12).

- image members: by suffix in any case and by content; the primary one by format order
- safe names: absolute and `..` names refused, links never followed, long names written (PAX)
- member grouping: duplicated and non-adjacent keys become error rows for that key
- strict JSON: invalid UTF-8, NaN, 1e999 are not JSON we rewrite; what we write is strict
- whole-shard reads: truncated, zero-byte, corrupt in the middle, not a tar -> `ShardError`;
  ``.tar.gz`` read and written compressed; an S3 shard through the spool
- resume: the settings fingerprint diff names what changed; a replaced input changes the unit's identity
- `--steps 0` with a gradient method is refused; the end-of-run notes group warnings and errors
- JPEG: the source's quantisation tables and subsampling are written back; ``jpeg_as="png"``
- folders: ``a.png`` + ``a.jpg`` get two keys; RGB PNGs with a tRNS colour key keep their transparency
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from pyarrow import fs as pafs

from pipeline.batch.commit import (
    Unit,
    assemble_shard,
    input_identity,
    same_suffix,
    settings_diff,
    tar_end,
    tar_members,
)
from pipeline.batch.stages import protected_meta
from pipeline.io.images import decode_image, encode_image
from pipeline.io.sample_data import png_bytes, shard_bytes
from pipeline.io.storage import folder_key, same_stem_files
from pipeline.io.webdataset import (
    ShardError,
    group_members,
    image_suffix,
    member_key,
    primary_image,
    read_shard,
    sample_row,
    strict_json,
    unsafe_name,
)
from pipeline.protect.encoded import finish

LOCAL = pafs.LocalFileSystem()
RGB = (np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3)
PNG = png_bytes(RGB, "PNG")
JPEG = png_bytes(RGB, "JPEG")


def tar_of(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tar.addfile(e)
            else:
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tar.addfile(info, io.BytesIO(e[1]))
    return buf.getvalue()


def infos(names: list[str]) -> list[tarfile.TarInfo]:
    return tarfile.open(fileobj=io.BytesIO(tar_of([(n, b"x") for n in names]))).getmembers()


def test_image_members_by_suffix_in_any_case_and_by_content():
    assert all(image_suffix(s, b"") for s in ("PNG", "JPG", "JpEg", "thumb.jpg", "webp"))
    assert image_suffix("thumbnail", PNG) and image_suffix("preview.bin", JPEG)  # content: PNG / JPEG magic
    assert not image_suffix("json", PNG) and not image_suffix("pkl", PNG)  # never sniffed
    assert not image_suffix("bin", b"\x80\x04 pickled bytes") and not image_suffix("txt", b"hello")
    assert primary_image(["thumb.jpg", "JPG", "PNG"]) == "PNG" and primary_image([]) is None
    row = sample_row("k", "s.tar", {"PNG": PNG, "thumb": JPEG, "pkl": b"\x80\x04x", "json": b"{}"})
    assert (row["ext"], row["more_images"]) == ("PNG", ["thumb"])
    assert row["member_names"] == ["json", "pkl", "thumb"] and row["member_data"][1] == b"\x80\x04x"


def test_unsafe_names_links_duplicates_and_split_keys_are_refused_per_key():
    assert member_key("dir/a.seg.png") == ("dir/a", "seg.png")
    assert unsafe_name("/etc/a.png") and unsafe_name("../a.png") and unsafe_name("x/../../a.png")
    assert unsafe_name("ok/a.png") is None and unsafe_name("a..b.png") is None
    link = tarfile.TarInfo("l.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    members = infos(["a.png", "a.json", "b.png", "a.txt", "c.png", "c.png", "../d.png", "/e.png"])
    members.append(link)
    samples, bad = group_members(members)
    assert [k for k, _ in samples] == ["a", "b", "c", "../d", "/e", "l"]
    assert "not adjacent" in bad["a"] and "duplicated" in bad["c"] and "'..'" in bad["../d"]
    assert "absolute" in bad["/e"] and "link" in bad["l"] and "b" not in bad


def test_strict_json_and_what_we_write():
    assert strict_json(b'{"a": 1.5}') == '{"a": 1.5}'
    for bad in (b'{"a": 1e999}', b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": "\xff\xfe"}', b"{nope"):
        assert strict_json(bad) is None, bad
    # a JSON member we cannot rewrite stays byte-exact; the parameters go to mimicshield.json
    text, name = protected_meta(None, {"eps": 8.0}, json_member=True)
    assert name == "mimicshield.json" and json.loads(text) == {"mimicshield": {"eps": 8.0}}
    assert protected_meta(None, {"eps": 8.0})[1] == "json"
    with pytest.raises(ValueError):
        protected_meta('{"a": 1}', {"eps": float("inf")})  # never write Infinity


def test_whole_shard_reads(tmp_path, s3_server, s3_bucket):
    good = shard_bytes([{"__key__": "a", "png": PNG, "json": b'{"x": 1}'}, {"__key__": "b", "jpg": JPEG}])
    cases = {
        "ok.tar": good,
        "truncated.tar": good[:1500],
        "empty.tar": b"",
        "notatar.tar": b"this is not a tar archive at all" * 64,
        "corrupt.tar": good[:1024 + len(PNG) // 512 * 512] + b"garbage!" * 64 + good[-2048:],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    rows = list(read_shard(LOCAL, str(tmp_path / "ok.tar")))
    assert [(r["key"], r["ext"], r["stage"]) for r in rows] == [("a", "png", None), ("b", "jpg", None)]
    assert rows[0]["meta"] == '{"x": 1}'
    for name in ("truncated.tar", "empty.tar", "notatar.tar", "corrupt.tar"):
        with pytest.raises(ShardError):
            list(read_shard(LOCAL, str(tmp_path / name)))
    (tmp_path / "z.tar.gz").write_bytes(gzip.compress(good))
    assert [r["key"] for r in read_shard(LOCAL, str(tmp_path / "z.tar.gz"))] == ["a", "b"]
    (tmp_path / "bad.tgz").write_bytes(gzip.compress(good)[:-40])
    with pytest.raises(ShardError):
        list(read_shard(LOCAL, str(tmp_path / "bad.tgz")))

    import boto3

    boto3.client("s3", **s3_server).put_object(Bucket=s3_bucket, Key="in/ok.tar", Body=good)
    s3 = pafs.S3FileSystem(endpoint_override=s3_server["endpoint_url"].split("//")[1], scheme="http",
                           region="us-east-1", access_key="testing", secret_key="testing")
    remote = list(read_shard(s3, f"{s3_bucket}/in/ok.tar", "s3://"))
    assert [r["key"] for r in remote] == ["a", "b"] and remote[0]["source"] == f"s3://{s3_bucket}/in/ok.tar"


def test_long_names_are_written_and_gzip_shards_compressed(tmp_path):
    key = "k" * 150 + "/ü" * 3
    part = tmp_path / "p.tar"
    part.write_bytes(tar_members(key, [("png", PNG), ("json", b"{}")]))
    assemble_shard(LOCAL, [str(part)], str(tmp_path / "out.tar.gz"))
    with tarfile.open(tmp_path / "out.tar.gz") as tar:  # transparently gzip
        assert [m.name for m in tar.getmembers()] == [f"{key}.png", f"{key}.json"]
        assert tar.extractfile(f"{key}.png").read() == PNG
    assert (tmp_path / "out.tar.gz").read_bytes()[:2] == b"\x1f\x8b"
    short = tar_members("a", [("png", b"x")])  # an ordinary name: a plain USTAR header, as before
    assert short[257:262] == b"ustar" and len(short) == 1024 and len(tar_end(len(short))) % 512 == 0


def test_suffix_spelling_and_settings_fingerprint_diff(tmp_path):
    assert same_suffix("JPG", "jpg") == "JPG" and same_suffix("thumb.jpeg", "jpg") == "thumb.jpeg"
    assert same_suffix("thumb.JPG", "png") == "thumb.png" and same_suffix("PNG", "png") == "PNG"
    assert same_suffix("preview", "png") == "preview"  # an image found by content keeps its member name
    old = {"eps": 8.0, "steps": 2, "model": "tiny"}
    assert settings_diff(old, dict(old)) == []
    assert settings_diff(old, {**old, "eps": 16.0, "steps": 4}) == ["eps: 8.0 -> 16.0", "steps: 2 -> 4"]
    assert settings_diff(None, old)  # a marker without a fingerprint is never taken as the same
    f = tmp_path / "s.tar"
    f.write_bytes(b"x" * 10)
    a = Unit("s", [str(f)], "", identity=[input_identity(LOCAL.get_file_info(str(f)))])
    f.write_bytes(b"y" * 11)  # replaced input shard: other size
    b = Unit("s", [str(f)], "", identity=[input_identity(LOCAL.get_file_info(str(f)))])
    assert a.fingerprint() != b.fingerprint()


def test_jpeg_tables_kept_or_png_and_trns_transparency_kept():
    src = io.BytesIO()
    Image.fromarray(RGB).save(src, "JPEG", quality=60, subsampling=2)
    image = decode_image(src.getvalue())
    assert image.jpeg_subsampling == 2 and image.jpeg_qtables
    written = Image.open(io.BytesIO(encode_image(image, image.rgb)))
    assert {k: list(v) for k, v in written.quantization.items()} == image.jpeg_qtables
    delta = np.full(RGB.shape, 4, np.int16)
    as_jpeg = finish("k", image, delta, 4.0)  # the source's coefficients plus the perturbation's: within budget
    assert as_jpeg.ext == "jpg" and as_jpeg.metrics["linf"] <= 4
    assert {k: list(v) for k, v in Image.open(io.BytesIO(as_jpeg.data)).quantization.items()} == image.jpeg_qtables
    as_png = finish("k", image, delta, 4.0, jpeg_as="png")
    assert as_png.ext == "png" and as_png.metrics["linf"] <= 4 and not as_png.warnings

    keyed = io.BytesIO()
    Image.fromarray(RGB).save(keyed, "PNG", transparency=tuple(int(v) for v in RGB[0, 0]))
    image = decode_image(keyed.getvalue())
    assert image.alpha is not None and image.alpha[0, 0] == 0 and image.output_mode == "RGBA"
    out = Image.open(io.BytesIO(finish("k", image, delta, 4.0).data))
    assert out.mode == "RGBA" and np.asarray(out)[0, 0, 3] == 0 and np.asarray(out)[1, 1, 3] == 255


def test_folder_keys_are_distinct_for_same_stem_files_and_dangling_links_listed(tmp_path):
    paths = ["/in/a.jpg", "/in/a.png", "/in/b.png", "/in/d/a.png"]
    same = same_stem_files(paths)
    assert [folder_key(p, "/in", same) for p in paths] == ["a.jpg", "a.png", "b", "d/a"]
    from pipeline.io.storage import list_images

    (tmp_path / "ok.png").write_bytes(PNG)
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")  # listed: reading it gives an error row
    assert list_images(LOCAL, str(tmp_path)) == [str(tmp_path / "gone.png"), str(tmp_path / "ok.png")]


def test_steps_zero_refused_and_summary_notes_grouped():
    from collections import Counter

    from pipeline.batch.driver import summary_notes
    from pipeline.commands.protect import parse_settings

    with pytest.raises(ValueError, match="--steps 0"):
        parse_settings(["in", "out", "--model", "tiny", "--steps", "0"])
    assert parse_settings(["in", "out", "--model", "tiny", "--steps", "0", "--method", "fastprotect+pgd"])
    reasons = Counter({"not an image": 3, "empty file (0 bytes)": 2, "too large": 1, "animated GIF": 1})
    notes = summary_notes(Counter({"mode P written as RGB": 2}), [37.0, 20.0, 17.0], reasons, 16.0)
    assert notes[0] == "3 JPEG output(s) exceed the budget after compression: max L-inf 37 > 16 (--jpeg-as png keeps it exact)"
    assert notes[1:4] == ["2 sample(s): mode P written as RGB", "3 error(s): not an image", "2 error(s): empty file (0 bytes)"]
    assert notes[-1].startswith("... and 1 other error reason(s)")
    kept = summary_notes(Counter(), [], Counter(), 16.0, jpeg_kept=[0.4, 0.2, 0.3])  # one line, not one per share
    assert kept == ["3 JPEG output(s) within the budget keep 30% of their perturbation on average (least 20%) through "
                    "their own quantisation; --jpeg-as png keeps all of it"]
