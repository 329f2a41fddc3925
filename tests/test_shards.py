"""The unit commit protocol of `pipeline/batch/commit.py` on a local folder, without Ray (fast).

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

from pipeline.batch.commit import (
    Unit,
    UnitResult,
    commit_unit,
    committed,
    marker_path,
    part_path,
    parts_dir,
    plan_units,
    same_suffix,
    tar_members,
)
from pipeline.batch.records import RunRecord
from pipeline.batch.stages import protected_meta
from pipeline.cluster.faults import FAULT_ENV, InjectedFault
from pipeline.io import tables
from pipeline.io.files import write_atomic
from pipeline.models.loading import ModelSpec
from pipeline.protect.engine import ProtectConfig

pytestmark = pytest.mark.mutation  # fast: mutmut runs this module (README, "Tests")
LOCAL = pafs.LocalFileSystem()
RUN = RunRecord("run-1", ProtectConfig(method="sds-", eps=8.0, step_size=1.0, steps=2), ModelSpec("tiny"))
MEASURED = {"width": 4, "height": 3, "linf": 8.0, "psnr": 40.0, "ssim": 0.9, "lpips": None, "seconds": 0.5,
            "device": "cpu", "warnings": None}


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def staged_result(tmp_path: Path, samples: list[tuple[str, list[tuple[str, bytes]]]], errors=(), per_part=1):
    """A shard unit as the workers leave it: its samples' tar members written as staging parts."""
    out = str(tmp_path / "out")
    unit = Unit("shard-000000", [str(tmp_path / "in" / "shard-000000.tar")], f"{out}/shard-000000.tar")
    result = UnitResult(unit)
    for i in range(0, len(samples), per_part):
        path = part_path(out, unit.id, RUN.run_id)
        write_atomic(LOCAL, path, b"".join(tar_members(k, m) for k, m in samples[i : i + per_part]))
        result.parts.append(path)
    for key, m in samples:
        result.metrics.append(RUN.metric_row(key, unit.inputs[0], unit.output, m[0][0], MEASURED))
    for key, reason in errors:
        result.errors.append({"key": key, "source": unit.inputs[0], "stage": "decode", "reason": reason,
                              "run_id": RUN.run_id})
    result.counts.samples = len(samples) + len(errors)
    result.counts.written, result.counts.errors = len(samples), len(errors)
    return out, unit, result


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


def test_fingerprint_depends_on_every_input_and_its_order():
    a = Unit("u", ["/in/1.png", "/in/2.png"], "/out")
    assert a.fingerprint() == Unit("other-id", ["/in/1.png", "/in/2.png"], "/x").fingerprint()
    assert a.fingerprint() != Unit("u", ["/in/1.png"], "/out").fingerprint()
    assert a.fingerprint() != Unit("u", ["/in/2.png", "/in/1.png"], "/out").fingerprint()
    assert a.fingerprint() != Unit("u", ["/in/1.png", "/in/3.png"], "/out").fingerprint()


# --------------------------------------------------------------------------- commit


def test_commit_assembles_parts_then_writes_tables_and_marker(tmp_path):
    samples = [("a", [("png", b"A"), ("cls", b"7"), ("json", b'{"x": 1}')]), ("c", [("jpeg", b"C" * 700)]),
               ("d", [("png", b"D")])]
    out, unit, result = staged_result(tmp_path, samples, errors=[("b", "bad")], per_part=2)
    assert len(result.parts) == 2
    counts = commit_unit(LOCAL, out, "shards", result, RUN.run_id)
    assert (counts.samples, counts.written, counts.errors) == (4, 3, 1)

    got = members(Path(unit.output))  # the parts, concatenated in order, form one valid tar
    assert got == [("a.png", b"A"), ("a.cls", b"7"), ("a.json", b'{"x": 1}'), ("c.jpeg", b"C" * 700),
                   ("d.png", b"D")]
    with tarfile.open(unit.output) as tar:
        assert {(m.mtime, m.mode) for m in tar.getmembers()} == {(0, 0o644)}  # deterministic bytes

    root = tmp_path / "out" / "tables"
    tables.check_file(str(root / "protect_metrics" / "shard-000000.parquet"), "protect_metrics")
    tables.check_file(str(root / "errors" / "shard-000000.parquet"), "errors")
    metrics = pq.read_table(root / "protect_metrics" / "shard-000000.parquet").to_pylist()
    assert [(r["key"], r["format"], r["output"], r["run_id"]) for r in metrics] == [
        ("a", "png", unit.output, "run-1"), ("c", "jpeg", unit.output, "run-1"), ("d", "png", unit.output, "run-1")]
    assert metrics[0]["eps"] == 8.0 and metrics[0]["method"] == "sds-" and metrics[0]["steps"] == 2
    errors = pq.read_table(root / "errors" / "shard-000000.parquet").to_pylist()
    assert [(r["key"], r["stage"], r["reason"]) for r in errors] == [("b", "decode", "bad")]

    marker = json.loads(Path(marker_path(out, unit.id)).read_text())
    assert marker["inputs_digest"] == unit.fingerprint()
    assert (marker["samples"], marker["written"], marker["errors"]) == (4, 3, 1)
    assert committed(LOCAL, out, [unit]) == {unit.id}
    assert not Path(parts_dir(out, unit.id)).exists()  # staging removed after the marker
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_protection_parameters_go_into_the_sample_json():
    params = {"method": "sds-", "eps": 8.0}
    text, name = protected_meta('{"caption": "x"}', params)
    assert name == "json" and json.loads(text) == {"caption": "x", "mimicshield": params}
    text, name = protected_meta(None, params)
    assert name == "json" and json.loads(text) == {"mimicshield": params}
    text, name = protected_meta("[1]", params)  # not an object: kept as it is, the parameters beside it
    assert name == "mimicshield.json" and json.loads(text) == {"mimicshield": params}


@pytest.mark.parametrize("point, shard, tables_, marker", [
    ("output-written", True, False, False),
    ("tables-written", True, True, False),
    ("committed", True, True, True),
])
def test_a_crash_at_each_point_leaves_exactly_the_steps_before_it(point, shard, tables_, marker, tmp_path,
                                                                   monkeypatch):
    out, unit, result = staged_result(tmp_path, [("a", [("png", b"A")]), ("b", [("png", b"B")])])
    monkeypatch.setenv(FAULT_ENV, f"{point}:{unit.id}")
    with pytest.raises(InjectedFault):
        commit_unit(LOCAL, out, "shards", result, RUN.run_id)
    assert Path(unit.output).exists() == shard
    assert (tmp_path / "out" / "tables" / "protect_metrics" / "shard-000000.parquet").exists() == tables_
    assert (tmp_path / "out" / "tables" / "errors" / "shard-000000.parquet").exists() == tables_
    assert Path(marker_path(out, unit.id)).exists() == marker
    assert committed(LOCAL, out, [unit]) == ({unit.id} if marker else set())


def test_fault_point_only_fires_for_its_unit(tmp_path, monkeypatch):
    out, unit, result = staged_result(tmp_path, [("a", [("png", b"A")])])
    monkeypatch.setenv(FAULT_ENV, "output-written:some-other-unit")
    commit_unit(LOCAL, out, "shards", result, RUN.run_id)
    assert committed(LOCAL, out, [unit]) == {unit.id}


def test_committed_needs_a_marker_for_the_same_inputs(tmp_path):
    out = str(tmp_path / "out")
    units = [Unit("u0", ["/in/a.png"], out), Unit("u1", ["/in/b.png"], out), Unit("u2", ["/in/c.png"], out)]
    assert committed(LOCAL, out, units) == set()  # no marker folder at all
    for unit in units[:2]:
        write_atomic(LOCAL, marker_path(out, unit.id), json.dumps({"inputs_digest": unit.fingerprint()}).encode())
    (tmp_path / "out" / "tables" / "_units" / "u2.json").write_text(json.dumps({"inputs_digest": "stale"}))
    assert committed(LOCAL, out, units) == {"u0", "u1"}
    changed = [Unit("u0", ["/in/a.png", "/in/new.png"], out), units[1], units[2]]
    assert committed(LOCAL, out, changed) == {"u1"}  # u0's inputs changed since its marker


# --------------------------------------------------------------------------- small parts


def test_write_atomic_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = str(tmp_path / "deep" / "er" / "file.bin")
    write_atomic(LOCAL, path, b"first")
    write_atomic(LOCAL, path, b"second")
    assert Path(path).read_bytes() == b"second"
    local = tmp_path / "spooled.tar"
    local.write_bytes(b"from a file")
    write_atomic(LOCAL, str(tmp_path / "copy.tar"), local_file=str(local))
    assert (tmp_path / "copy.tar").read_bytes() == b"from a file"
    assert sorted(p.name for p in (tmp_path / "deep" / "er").iterdir()) == ["file.bin"]


def test_same_suffix_keeps_the_original_spelling_of_the_same_format():
    assert same_suffix("jpeg", "jpg") == "jpeg"
    assert same_suffix("jpg", "jpg") == "jpg"
    assert same_suffix("tiff", "tif") == "tiff"
    assert same_suffix("gif", "png") == "png"
    assert same_suffix(None, "png") == "png"
