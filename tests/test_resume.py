"""Resume after a crash in every window of a unit's commit, for folders (chunks), local shards and S3.

A unit is committed as: output (shard upload, or the chunk's files), then its table files, then a
marker. A crash is injected at the one seam the commit offers for it, `pipeline.batch.commit.fault_point`,
through its environment variable (``MIMICSHIELD_FAULT=<point>:<unit id>``):

    run A  crash after unit 0's tables, before its marker     -> unit 0 is not committed
    run B  crash after unit 1's output, before its tables     -> unit 0 redone, unit 1 not committed
    run C  crash in the middle of unit 2 (one sample in)      -> unit 1 redone, unit 2 not committed
    run D  no crash                                           -> units 0, 1 skipped, unit 2 redone

After each run the runs table says what was skipped and done; at the end the outputs are
byte-identical to an uninterrupted run's (the per-sample JSON differs only in its run id), and every
table holds each sample exactly once. A changed input (another set of files in a chunk) is redone.
"""

from __future__ import annotations

import io as stdio
import json
import tarfile
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.cluster.faults import FAULT_ENV
from pipeline.io import tables
from pipeline.io.sample_data import photo_samples, shard_bytes

pytestmark = pytest.mark.slow
ARGS = ["--model", "tiny", "--steps", "2", "--eps", "8", "--step-size", "2", "--device", "cpu", "--batch-size", "2",
        "--chunk-size", "2", "--no-progress"]
UNITS = {"folder": [f"files-{i:06d}" for i in range(3)], "shards": [f"shard-{i:06d}" for i in range(3)]}
UNITS["s3"] = UNITS["shards"]


# --------------------------------------------------------------------------- where things are


class Place:
    """A local folder or an s3:// prefix, read back independently of the pipeline."""

    def __init__(self, uri: str, client=None):
        self.uri, self.client = uri, client

    def files(self) -> dict[str, bytes]:
        """Every file under the place: relative path -> bytes."""
        if self.uri.startswith("s3://"):
            bucket, _, prefix = self.uri[5:].partition("/")
            prefix = prefix.rstrip("/") + "/"
            out = {}
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(prefix):].lstrip("/")] = self.client.get_object(
                        Bucket=bucket, Key=obj["Key"])["Body"].read()
            return out
        root = Path(self.uri)
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def table_rows(files: dict[str, bytes], name: str) -> dict[str, list[dict]]:
    """Table file name -> rows, each file checked against schemas/<name>.json."""
    out = {}
    for rel, data in files.items():
        if rel.startswith(f"tables/{name}/") and rel.endswith(".parquet"):
            table = pq.read_table(stdio.BytesIO(data))
            assert [(f.name, f.type) for f in table.schema] == [(f.name, f.type) for f in tables.load_schema(name)]
            out[rel.rsplit("/", 1)[1][: -len(".parquet")]] = table.to_pylist()
    return out


def last_run(files: dict[str, bytes]) -> dict:
    runs = [r for rows in table_rows(files, "runs").values() for r in rows]
    return max(runs, key=lambda r: r["started_at"])


def outputs(files: dict[str, bytes]) -> dict[str, bytes]:
    return {rel: data for rel, data in files.items() if not rel.startswith("tables/")}


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=stdio.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def without_run_id(name: str, data: bytes) -> bytes:
    if not name.endswith(".json"):
        return data
    meta = json.loads(data)
    meta.get("mimicshield", {}).pop("run_id", None)
    return json.dumps(meta, sort_keys=True).encode()


def assert_same_outputs(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    """Same files; images byte-identical; shard members in the same order, JSON equal but for the run id."""
    assert sorted(got) == sorted(want)
    for rel, data in want.items():
        if rel.endswith(".tar"):
            a, b = tar_members(got[rel]), tar_members(data)
            assert [n for n, _ in a] == [n for n, _ in b], rel
            for (name, x), (_, y) in zip(a, b):
                assert without_run_id(name, x) == without_run_id(name, y), f"{rel}:{name}"
        else:
            assert got[rel] == data, rel


# --------------------------------------------------------------------------- inputs


def make_input(kind: str, tmp_path: Path, s3_server=None, bucket=None) -> tuple[str, str, object]:
    """(INPUT, OUTPUT prefix parent, boto3 client): 3 units of 2 samples each."""
    shards = [photo_samples(2, prefix=f"s{i}-") for i in range(3)]
    if kind == "folder":
        src = tmp_path / "in"
        src.mkdir()
        for i, samples in enumerate(shards):
            for s in samples:
                (src / f"{s['__key__']}.png").write_bytes(s["png"])
        return str(src), str(tmp_path), None
    if kind == "shards":
        src = tmp_path / "in"
        src.mkdir()
        for i, samples in enumerate(shards):
            (src / f"shard-{i:06d}.tar").write_bytes(shard_bytes(samples))
        return str(src), str(tmp_path), None
    client = boto3.client("s3", **s3_server)
    for i, samples in enumerate(shards):
        client.put_object(Bucket=bucket, Key=f"in/shard-{i:06d}.tar", Body=shard_bytes(samples))
    return f"s3://{bucket}/in/", f"s3://{bucket}", client


def protect(src: str, dst: str, capsys) -> tuple[int, str]:
    code = main(["protect", src, dst, *ARGS])
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- the crash windows


# folder (files) and s3 (shards on a remote store); local shards commit through the same code as s3 ones
# and are resumed in tests/test_archive_inputs.py (committed local shards skipped on a rerun)
@pytest.mark.parametrize("kind", ["folder", "s3"])
def test_resume_after_a_crash_in_each_commit_window(kind, ray_local, s3_server, s3_bucket, tmp_path, capsys,
                                                    monkeypatch):
    src, parent, client = make_input(kind, tmp_path, s3_server, s3_bucket)
    dst = Place(f"{parent}/out", client)
    u0, u1, u2 = UNITS[kind]
    marker = "tables/_units/{}.json".format

    # A: unit 0's output and tables are written, its marker is not
    monkeypatch.setenv(FAULT_ENV, f"tables-written:{u0}")
    code, err = protect(src, dst.uri, capsys)
    assert code == 1 and "injected" in err, err
    files = dst.files()
    assert marker(u0) not in files
    assert f"tables/protect_metrics/{u0}.parquet" in files and outputs(files)
    assert last_run(files)["status"] == "failed"

    # B: no marker means not committed: unit 0 is redone; unit 1's output is written, its tables are not
    monkeypatch.setenv(FAULT_ENV, f"output-written:{u1}")
    code, err = protect(src, dst.uri, capsys)
    assert code == 1 and "injected" in err, err
    files = dst.files()
    run = last_run(files)
    assert (run["units_skipped"], run["units_done"]) == (0, 1), run
    assert marker(u0) in files and marker(u1) not in files
    assert f"tables/protect_metrics/{u1}.parquet" not in files

    # C: unit 1 (output but no tables, no marker) is redone; the crash comes one sample into unit 2
    monkeypatch.setenv(FAULT_ENV, f"mid-unit:{u2}")
    code, err = protect(src, dst.uri, capsys)
    assert code == 1 and "injected" in err, err
    files = dst.files()
    run = last_run(files)
    assert (run["units_skipped"], run["units_done"]) == (1, 1), run
    assert marker(u1) in files and marker(u2) not in files

    # D: no crash: only unit 2 is computed
    monkeypatch.delenv(FAULT_ENV)
    code, err = protect(src, dst.uri, capsys)
    assert code == 0, err
    files = dst.files()
    run = last_run(files)
    assert run["status"] == "completed"
    assert (run["units_skipped"], run["units_done"], run["samples_in"]) == (2, 1, 2), run
    assert all(marker(u) in files for u in (u0, u1, u2))

    # the same as an uninterrupted run, and every table holds each sample once
    code, err = protect(src, f"{parent}/reference", capsys)
    assert code == 0, err
    reference = Place(f"{parent}/reference", client).files()
    assert_same_outputs(outputs(files), outputs(reference))
    got, want = table_rows(files, "protect_metrics"), table_rows(reference, "protect_metrics")
    assert sorted(got) == sorted(want) == sorted(UNITS[kind])
    keys = [r["key"] for rows in got.values() for r in rows]
    assert len(keys) == len(set(keys)) == 6
    drop = ("run_id", "seconds", "output")
    for unit in got:
        assert [{k: v for k, v in r.items() if k not in drop} for r in got[unit]] == \
               [{k: v for k, v in r.items() if k not in drop} for r in want[unit]], unit
    assert not any(table_rows(files, "errors").values())


def test_a_chunk_whose_files_changed_is_redone(ray_local, tmp_path, capsys):
    """The marker records the unit's inputs: a chunk holding other files than when it was committed is redone."""
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for s in photo_samples(4):  # img00000 .. img00003: chunks [0, 1], [2, 3]
        (src / f"{s['__key__']}.png").write_bytes(s["png"])
    code, err = protect(str(src), str(dst), capsys)
    assert code == 0, err
    # a new file sorting between img00001 and img00002: chunk 0 unchanged, chunk 1 = [new, 2], chunk 2 = [3]
    (src / "img00001b.png").write_bytes((src / "img00000.png").read_bytes())
    code, err = protect(str(src), str(dst), capsys)
    assert code == 0, err
    files = Place(str(dst)).files()
    run = last_run(files)
    assert (run["units_skipped"], run["units_done"], run["samples_in"]) == (1, 2, 3), run
    assert "img00001b.png" in files
    metrics = table_rows(files, "protect_metrics")
    assert sorted(r["key"] for r in metrics["files-000001"]) == ["img00001b", "img00002"]
    assert sorted(r["key"] for rows in metrics.values() for r in rows) == \
        ["img00000", "img00001", "img00001b", "img00002", "img00003"]
