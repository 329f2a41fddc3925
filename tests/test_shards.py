"""The unit commit protocol of `pipeline/shards.py` on a local folder, without Ray (fast).

What a finished unit leaves behind, in order (output, tables, marker), what counts as committed on a
rerun (a marker for the same inputs), and what a crash at each step leaves (the `fault_point` seam).
The end-to-end crash windows through the CLI and Ray are in test_resume.py.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from pipeline import tables
from pipeline.sample_data import shard_bytes
from pipeline.shards import (
    FAULT_ENV,
    CommitFault,
    Unit,
    UnitSink,
    committed,
    first_unreadable,
    marker_path,
    plan_units,
    same_suffix,
    write_bytes,
)

pytestmark = pytest.mark.mutation  # fast: mutmut runs this module (README, "Tests")
LOCAL = pafs.LocalFileSystem()
RUN = {"run_id": "run-1", "method": "sds-", "eps": 8.0, "step_size": 1.0, "steps": 2, "model": "tiny",
       "model_revision": None}


def row(key: str, source: str, image: bytes | None = b"png-bytes", stage: str | None = None, **extra) -> dict:
    base = {"key": key, "source": source, "image": image, "ext": "png", "meta": None, "member_names": [],
            "member_data": [], "width": 4, "height": 3, "stage": stage, "reason": "bad" if stage else None,
            "out_ext": "png", "linf": 8.0, "psnr": 40.0, "ssim": 0.9, "lpips": None, "seconds": 0.5,
            "device": "cpu", "warnings": None}
    base.update(extra)
    return base


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


# --------------------------------------------------------------------------- planning


def test_plan_units_for_shards_mirrors_relative_paths():
    paths = ["/in/a.tar", "/in/sub/b.tar", "/in/sub/deeper/c.tar"]
    units = plan_units("shards", paths, "/in", "/out")
    assert [u.id for u in units] == ["a", "sub__b", "sub__deeper__c"]
    assert [u.output for u in units] == ["/out/a.tar", "/out/sub/b.tar", "/out/sub/deeper/c.tar"]
    assert [u.inputs for u in units] == [[p] for p in paths]
    outside = plan_units("shards", ["/elsewhere/x.tar"], "/in", "/out")
    assert [(u.id, u.output) for u in outside] == [("x", "/out/x.tar")]
    with pytest.raises(ValueError, match="same output name"):
        plan_units("shards", ["/in/a/x.tar", "/in/b/x.tar"], "", "/out")


def test_plan_units_for_files_are_fixed_chunks_in_order():
    paths = [f"/in/{i}.png" for i in range(5)]
    units = plan_units("folder", paths, "/in", "/out", chunk_size=2)
    assert [u.id for u in units] == ["files-000000", "files-000001", "files-000002"]
    assert [u.inputs for u in units] == [paths[0:2], paths[2:4], paths[4:5]]
    assert all(u.output == "/out" for u in units)
    assert plan_units("folder", paths, "/in", "/out", chunk_size=256)[0].inputs == paths


def test_digest_depends_on_every_input_and_its_order():
    a = Unit("u", ["/in/1.png", "/in/2.png"], "/out")
    assert a.digest() == Unit("other-id", ["/in/1.png", "/in/2.png"], "/x").digest()
    assert a.digest() != Unit("u", ["/in/1.png"], "/out").digest()
    assert a.digest() != Unit("u", ["/in/2.png", "/in/1.png"], "/out").digest()
    assert a.digest() != Unit("u", ["/in/1.png", "/in/3.png"], "/out").digest()


# --------------------------------------------------------------------------- commit


def shard_sink(tmp_path: Path) -> tuple[UnitSink, Unit]:
    unit = Unit("shard-000000", [str(tmp_path / "in" / "shard-000000.tar")], str(tmp_path / "out" / "shard-000000.tar"))
    sink = UnitSink("shards", LOCAL, str(tmp_path / "out"), RUN, {"method": "sds-"}, tmpdir=str(tmp_path))
    return sink, unit


def test_commit_writes_shard_tables_and_marker(tmp_path):
    sink, unit = shard_sink(tmp_path)
    src = unit.inputs[0]
    sink.begin(unit)
    meta = json.dumps({"caption": "x"})  # as read: the JSON member is both `meta` and one of the members
    sink.add(row("a", src, image=b"A", meta=meta, member_names=["cls", "json", "txt"],
                 member_data=[b"7", meta.encode(), b"t"], out_ext="png", ext="png"))
    sink.add(row("b", src, stage="decode", image=None))
    sink.add(row("c", src, image=b"C", ext="jpeg", out_ext="jpg", meta="[1]", member_names=["json"],
                 member_data=[b"[1]"]))
    counts = sink.commit()
    assert (counts.samples, counts.written, counts.errors) == (3, 2, 1)

    got = members(tmp_path / "out" / "shard-000000.tar")
    assert [n for n, _ in got] == ["a.png", "a.cls", "a.json", "a.txt", "c.jpeg", "c.json",
                                 "c.mimicshield.json"]
    data = dict(got)
    assert data["a.png"] == b"A" and data["a.txt"] == b"t" and data["a.cls"] == b"7" and data["c.jpeg"] == b"C"
    assert json.loads(data["a.json"]) == {"caption": "x", "mimicshield": {"method": "sds-"}}
    assert data["c.json"] == b"[1]"  # not an object: kept as it was, the parameters beside it
    assert json.loads(data["c.mimicshield.json"]) == {"mimicshield": {"method": "sds-"}}
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert {(m.mtime, m.mode) for m in tar.getmembers()} == {(0, 0o644)}  # deterministic bytes

    root = tmp_path / "out" / "tables"
    metrics = pq.read_table(root / "protect_metrics" / "shard-000000.parquet").to_pylist()
    tables.check_file(str(root / "protect_metrics" / "shard-000000.parquet"), "protect_metrics")
    tables.check_file(str(root / "errors" / "shard-000000.parquet"), "errors")
    assert [(r["key"], r["format"], r["output"], r["run_id"]) for r in metrics] == [
        ("a", "png", str(tmp_path / "out" / "shard-000000.tar"), "run-1"),
        ("c", "jpeg", str(tmp_path / "out" / "shard-000000.tar"), "run-1")]
    assert metrics[0]["eps"] == 8.0 and metrics[0]["linf"] == 8.0 and metrics[0]["method"] == "sds-"
    errors = pq.read_table(root / "errors" / "shard-000000.parquet").to_pylist()
    assert [(r["key"], r["stage"], r["reason"]) for r in errors] == [("b", "decode", "bad")]

    marker = json.loads(Path(marker_path(str(tmp_path / "out"), unit.id)).read_text())
    assert marker["inputs_digest"] == unit.digest()
    assert (marker["samples"], marker["written"], marker["errors"]) == (3, 2, 1)
    assert committed(LOCAL, str(tmp_path / "out"), [unit]) == {unit.id}
    assert not list((tmp_path / "out").rglob("*.tmp")) and not list(tmp_path.glob("*.tar"))  # nothing left over


def test_folder_unit_writes_each_file_under_its_key(tmp_path):
    unit = Unit("files-000000", ["/in/a.png", "/in/sub/b.jpg"], str(tmp_path / "out"))
    sink = UnitSink("folder", LOCAL, str(tmp_path / "out"), RUN, {}, tmpdir=str(tmp_path))
    sink.begin(unit)
    sink.add(row("a", "/in/a.png", image=b"A"))
    sink.add(row("sub/b", "/in/sub/b.jpg", image=b"B", ext="jpg", out_ext="jpg"))
    sink.commit()
    assert (tmp_path / "out" / "a.png").read_bytes() == b"A"
    assert (tmp_path / "out" / "sub" / "b.jpg").read_bytes() == b"B"
    metrics = pq.read_table(tmp_path / "out" / "tables" / "protect_metrics" / "files-000000.parquet").to_pylist()
    assert [r["output"] for r in metrics] == [str(tmp_path / "out" / "a.png"), str(tmp_path / "out" / "sub" / "b.jpg")]


@pytest.mark.parametrize("point, shard, tables_, marker", [
    ("mid-unit", False, False, False),
    ("output-written", True, False, False),
    ("tables-written", True, True, False),
    ("committed", True, True, True),
])
def test_a_crash_at_each_point_leaves_exactly_the_steps_before_it(point, shard, tables_, marker, tmp_path,
                                                                   monkeypatch):
    sink, unit = shard_sink(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setenv(FAULT_ENV, f"{point}:{unit.id}")
    with pytest.raises(CommitFault):
        sink.begin(unit)
        sink.add(row("a", unit.inputs[0]))
        sink.add(row("b", unit.inputs[0]))
        sink.commit()
    sink.abort()
    assert (out / "shard-000000.tar").exists() == shard
    assert (out / "tables" / "protect_metrics" / "shard-000000.parquet").exists() == tables_
    assert (out / "tables" / "errors" / "shard-000000.parquet").exists() == tables_
    assert Path(marker_path(str(out), unit.id)).exists() == marker
    assert committed(LOCAL, str(out), [unit]) == ({unit.id} if marker else set())
    assert not list(tmp_path.glob("*.tar"))  # the spool never outlives the unit


def test_fault_point_only_fires_for_its_unit(tmp_path, monkeypatch):
    sink, unit = shard_sink(tmp_path)
    monkeypatch.setenv(FAULT_ENV, "output-written:some-other-unit")
    sink.begin(unit)
    sink.add(row("a", unit.inputs[0]))
    sink.commit()
    assert committed(LOCAL, str(tmp_path / "out"), [unit]) == {unit.id}


def test_committed_needs_a_marker_for_the_same_inputs(tmp_path):
    out = str(tmp_path / "out")
    units = [Unit("u0", ["/in/a.png"], out), Unit("u1", ["/in/b.png"], out), Unit("u2", ["/in/c.png"], out)]
    assert committed(LOCAL, out, units) == set()  # no marker folder at all
    for unit in units[:2]:
        write_bytes(LOCAL, marker_path(out, unit.id), json.dumps({"inputs_digest": unit.digest()}).encode())
    (tmp_path / "out" / "tables" / "_units" / "u2.json").write_text(json.dumps({"inputs_digest": "stale"}))
    assert committed(LOCAL, out, units) == {"u0", "u1"}
    changed = [Unit("u0", ["/in/a.png", "/in/new.png"], out), units[1], units[2]]
    assert committed(LOCAL, out, changed) == {"u1"}  # u0's inputs changed since its marker


# --------------------------------------------------------------------------- small parts


def test_write_bytes_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = str(tmp_path / "deep" / "er" / "file.bin")
    write_bytes(LOCAL, path, b"first")
    write_bytes(LOCAL, path, b"second")
    assert Path(path).read_bytes() == b"second"
    local = tmp_path / "spooled.tar"
    local.write_bytes(b"from a file")
    write_bytes(LOCAL, str(tmp_path / "copy.tar"), local_file=str(local))
    assert (tmp_path / "copy.tar").read_bytes() == b"from a file"
    assert sorted(p.name for p in (tmp_path / "deep" / "er").iterdir()) == ["file.bin"]


def test_same_suffix_keeps_the_original_spelling_of_the_same_format():
    assert same_suffix("jpeg", "jpg") == "jpeg"
    assert same_suffix("jpg", "jpg") == "jpg"
    assert same_suffix("tiff", "tif") == "tiff"
    assert same_suffix("gif", "png") == "png"
    assert same_suffix(None, "png") == "png"


def test_first_unreadable_names_the_bad_shard(tmp_path):
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    good.write_bytes(shard_bytes([{"__key__": "a", "png": b"x"}]))
    data = shard_bytes([{"__key__": "b", "png": b"y" * 4096}])
    bad.write_bytes(data[:2000])  # truncated inside the member (header 512 bytes, data 4096)
    units = [Unit("good", [str(good)], ""), Unit("bad", [str(bad)], "")]
    assert first_unreadable(LOCAL, units) == str(bad)
    assert first_unreadable(LOCAL, units[:1]) is None
    # at most `limit` units are read through (16 by default): a bad 17th is not looked at
    assert first_unreadable(LOCAL, [units[0]] * 16 + [units[1]]) is None
    assert first_unreadable(LOCAL, [units[0]] * 15 + [units[1]]) == str(bad)


def test_first_unreadable_names_an_s3_shard_by_its_uri(s3_server, s3_bucket):
    import boto3

    boto3.client("s3", **s3_server).put_object(Bucket=s3_bucket, Key="in/bad.tar", Body=b"not a tar" * 100)
    s3 = pafs.S3FileSystem(endpoint_override=s3_server["endpoint_url"].split("//")[1], scheme="http",
                           region="us-east-1", access_key="testing", secret_key="testing")
    assert first_unreadable(s3, [Unit("bad", [f"{s3_bucket}/in/bad.tar"], "")]) == f"s3://{s3_bucket}/in/bad.tar"
