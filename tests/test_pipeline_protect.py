"""`mimicshield protect` through Ray: S3 -> S3, folder -> folder, bad samples, resume, fail fast.

Real components throughout: a moto server on loopback, a local Ray, the built-in tiny model.
"""

from __future__ import annotations

import io as stdio
import json
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import tar_samples
from PIL import Image
from pyarrow import fs as pafs

from jobs.protect import main as protect_job
from pipeline.cli import main
from pipeline.io import tables
from pipeline.io.sample_data import bad_samples, photo_samples, shard_bytes

pytestmark = pytest.mark.slow
EPS = 8
FAST = ["--model", "tiny", "--steps", "2", "--eps", str(EPS), "--step-size", "2", "--device", "cpu",
        "--batch-size", "4", "--no-progress"]


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(stdio.BytesIO(data)).convert("RGB"), dtype=np.int16)


def check_tables(filesystem, root: str) -> dict[str, list[dict]]:
    """Every Parquet file under root/tables/<name>/ matches schemas/<name>.json; returns the rows."""
    rows = {}
    for name in ("protect_metrics", "errors", "runs"):
        sel = pafs.FileSelector(f"{root}/tables/{name}", allow_not_found=True)
        files = [i.path for i in filesystem.get_file_info(sel) if i.path.endswith(".parquet")]
        assert files, f"no {name} table written"
        for path in files:
            tables.check_file(path, name, filesystem=filesystem)
        rows[name] = [r for p in files for r in pq.read_table(p, filesystem=filesystem).to_pylist()]
    return rows


def test_s3_to_s3_keys_metadata_budget_tables(ray_local, s3_server, s3_bucket, capsys):
    client = boto3.client("s3", **s3_server)
    shards = [photo_samples(3, sizes=((64, 64), (64, 96)), prefix=f"s{i}-") for i in range(2)]
    shards[0][1]["cls"] = b"7"  # an extra member that must travel untouched
    shards[0][2]["pkl"] = b"\x80\x04 never unpickled"
    for i, samples in enumerate(shards):
        client.put_object(Bucket=s3_bucket, Key=f"in/shard-{i:06d}.tar", Body=shard_bytes(samples))

    code = main(["protect", f"s3://{s3_bucket}/in/shard-{{000000..000001}}.tar", f"s3://{s3_bucket}/out/", *FAST])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "6 samples in, 6 protected, 0 errors" in out.out
    assert "testing" not in out.out + out.err  # the credentials never show

    for i, samples in enumerate(shards):
        written = tar_samples(client.get_object(Bucket=s3_bucket, Key=f"out/shard-{i:06d}.tar")["Body"].read())
        assert sorted(written) == sorted(s["__key__"] for s in samples)
        for sample in samples:
            got = written[sample["__key__"]]
            meta = json.loads(got["json"])
            assert meta["caption"] == json.loads(sample["json"])["caption"]  # original metadata kept
            assert meta["mimicshield"]["method"] == "sds-" and meta["mimicshield"]["eps"] == EPS
            assert np.abs(rgb(got["png"]) - rgb(sample["png"])).max() <= EPS  # budget on the decoded file
            assert rgb(got["png"]).shape == rgb(sample["png"]).shape
            for extra in ("cls", "pkl"):
                if extra in sample:
                    assert got[extra] == sample[extra]

    s3 = pafs.S3FileSystem(endpoint_override=s3_server["endpoint_url"].split("//")[1], scheme="http",
                           region="us-east-1", access_key="testing", secret_key="testing")
    rows = check_tables(s3, f"{s3_bucket}/out")
    assert len(rows["protect_metrics"]) == 6 and not rows["errors"]
    assert max(r["linf"] for r in rows["protect_metrics"]) <= EPS
    assert all(r["lpips"] is None for r in rows["protect_metrics"])  # no calibrated weights: not reported
    (run,) = rows["runs"]
    assert run["status"] == "completed" and run["samples_in"] == 6 and run["samples_written"] == 6
    assert "testing" not in run["config"] and json.loads(run["config"])["protect"]["method"] == "sds-"


def test_folder_to_folder(ray_local, tmp_path, capsys):
    src, dst = tmp_path / "art", tmp_path / "protected"
    (src / "sub").mkdir(parents=True)
    samples = photo_samples(3, sizes=((64, 64), (72, 64)), formats=("PNG", "WEBP"))
    names = []
    for i, s in enumerate(samples):
        ext = "png" if "png" in s else "webp"
        rel = f"{'sub/' if i == 2 else ''}{s['__key__']}.{ext}"
        (src / rel).write_bytes(s[ext])
        names.append(rel)
    config = tmp_path / "job.yaml"  # through the Ray job entry point and a config file
    config.write_text(f"input: {src}\noutput: {dst}\nmodel: tiny\nsteps: 2\neps: {EPS}\nstep_size: 2\n"
                      "device: cpu\nno_progress: true\n")
    code = protect_job(["--config", str(config)])
    assert code == 0, capsys.readouterr().err
    for rel in names:
        before, after = rgb((src / rel).read_bytes()), rgb((dst / rel).read_bytes())
        assert before.shape == after.shape and np.abs(after - before).max() <= EPS
    rows = check_tables(pafs.LocalFileSystem(), str(dst))
    assert sorted(r["key"] for r in rows["protect_metrics"]) == sorted(n.rsplit(".", 1)[0] for n in names)


def test_bad_samples_become_error_rows(ray_local, tmp_path, capsys):
    import torchvision
    from safetensors.torch import save_file

    good = photo_samples(2)
    samples = [good[0], *bad_samples(good[1]["png"]), good[1]]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "mixed.tar").write_bytes(shard_bytes(samples))
    # AlexNet weights in torchvision's format (random here: real ones cannot be downloaded) fill `lpips`
    save_file(torchvision.models.alexnet(weights=None).state_dict(), str(tmp_path / "alexnet.safetensors"))
    code = main(["protect", str(tmp_path / "in"), str(tmp_path / "out"), *FAST,
                 "--lpips-weights", str(tmp_path / "alexnet.safetensors")])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = check_tables(pafs.LocalFileSystem(), str(tmp_path / "out"))
    errors = {r["key"]: r for r in rows["errors"]}
    assert set(errors) == {"bad-corrupt", "bad-truncated", "bad-empty", "bad-notimage", "bad-bomb", "bad-noimage"}
    assert "too large" in errors["bad-bomb"]["reason"]  # refused from the header, before decoding
    assert "empty" in errors["bad-empty"]["reason"]
    assert len(rows["protect_metrics"]) + len(rows["errors"]) == len(samples)  # counts balance
    assert all(r["lpips"] > 0 for r in rows["protect_metrics"])  # computed, and the images did change
    written = tar_samples((tmp_path / "out" / "mixed.tar").read_bytes())
    assert sorted(written) == sorted(g["__key__"] for g in good)
    assert f"{len(samples)} samples in, 2 protected, 6 errors" in out.out


def test_shards_written_by_workers_committed_by_the_driver(ray_local, tmp_path, monkeypatch, capsys):
    """The driver writes no image byte: shard writes from this process fail, yet the run completes."""
    from pipeline.batch import commit as shards
    from pipeline.protect import engine

    real_write, real_post_init = shards.write_atomic, engine.ProtectConfig.__post_init__
    built = []

    def driver_write(out_fs, path, data=None, local_file=None):
        assert path.endswith(".json"), f"the driver wrote {path}"  # markers only
        return real_write(out_fs, path, data, local_file)

    def counting_post_init(self):
        built.append(self.method)
        real_post_init(self)

    monkeypatch.setattr(shards, "write_atomic", driver_write)
    monkeypatch.setattr(shards, "assemble_shard", lambda *a: pytest.fail("shard assembled on the driver"))
    monkeypatch.setattr(engine.ProtectConfig, "__post_init__", counting_post_init)
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    inputs = {i: photo_samples(3, sizes=((64, 64),), prefix=f"s{i}-") for i in range(2)}
    for i, samples in inputs.items():
        (src / f"shard-{i:06d}.tar").write_bytes(shard_bytes(samples))
    (dst / "tables" / "_parts" / "shard-000001").mkdir(parents=True)  # staging left by a killed run
    (dst / "tables" / "_parts" / "shard-000001" / "old-run-0.tar").write_bytes(b"stale")
    code = main(["protect", str(src), str(dst), *FAST, "--batch-size", "2"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert built == ["sds-"]  # the ProtectConfig was built (and validated) once on the driver
    for i, samples in inputs.items():
        written = tar_samples((dst / f"shard-{i:06d}.tar").read_bytes())
        assert list(written) == [s["__key__"] for s in samples]  # input order, nothing stale, no duplicate
    assert not any((dst / "tables" / "_parts").iterdir())  # staging emptied
    rows = check_tables(pafs.LocalFileSystem(), str(dst))
    assert sorted(r["key"] for r in rows["protect_metrics"]) == sorted(s["__key__"] for v in inputs.values() for s in v)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nope"], "unknown method"),
        (["--model", "no-such-model"], "unknown model"),
        (["OUT=s3://missing-bucket-xyz/out/"], "bucket missing-bucket-xyz does not exist"),
    ],
)
def test_whole_run_failures_fail_fast(s3_server, tmp_path, capsys, args, message):
    src = tmp_path / "in"
    src.mkdir()
    (src / "shard-000000.tar").write_bytes(shard_bytes(photo_samples(1)))
    output = str(tmp_path / "out")
    if args[0].startswith("OUT="):
        output, args = args[0][4:], []
    code = main(["protect", str(src), output, *FAST, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") <= 2
    assert not Path(tmp_path / "out").exists()
