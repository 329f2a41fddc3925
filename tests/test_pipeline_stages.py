"""The pipeline's stages and commit protocol: the actor does tensor work only, workers write, the
driver commits; the typed settings are validated once, and the command line beats the config file.
"""

from __future__ import annotations

import io as stdio
import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from pyarrow import fs as pafs

from pipeline.batch.commit import (
    Unit,
    UnitIndex,
    UnitResult,
    assemble_shard,
    commit_unit,
    committed,
    parts_dir,
    tar_end,
    tar_members,
)
from pipeline.batch.records import RunRecord
from pipeline.batch.stages import RESULT_SCHEMA, Decoder, Encoder, ProtectActor, Writer
from pipeline.io.sample_data import photo_samples, shard_bytes
from pipeline.models.loading import ModelSpec, load_models
from pipeline.protect import ProtectConfig, build_protector
from pipeline.protect.encoded import protect_encoded

EPS = 8


def reference_tar(samples: list[tuple[str, list[tuple[str, bytes]]]]) -> bytes:
    """The same samples written by tarfile itself (what the old driver-side spool produced)."""
    buf = stdio.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for suffix, data in members:
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, stdio.BytesIO(data))
    return buf.getvalue()


def test_parts_concatenate_to_the_tar_tarfile_writes(tmp_path):
    samples = [("a", [("png", b"x" * 700), ("json", b"{}")]), ("b", [("png", b"y" * 512)]), ("c", [("cls", b"")])]
    parts = []
    for i, chunk in enumerate((samples[:2], samples[2:])):  # two parts, as from two writer batches
        path = tmp_path / f"part{i}.tar"
        path.write_bytes(b"".join(tar_members(k, m) for k, m in chunk))
        parts.append(str(path))
    size = assemble_shard(pafs.LocalFileSystem(), parts, str(tmp_path / "out" / "shard.tar"))
    written = (tmp_path / "out" / "shard.tar").read_bytes()
    assert written == reference_tar(samples) and size == len(written)
    empty = tmp_path / "empty.tar"
    assemble_shard(pafs.LocalFileSystem(), [], str(empty))
    assert empty.read_bytes() == reference_tar([]) == tar_end(0)


def test_unit_index_finds_folder_chunks_by_bisection():
    paths = [f"/in/{c}/{i:03d}.png" for c in "abc" for i in range(5)]
    units = [Unit(id=f"files-{i:06d}", inputs=paths[i : i + 4], output="/out") for i in range(0, len(paths), 4)]
    index = UnitIndex("folder", units)
    assert [index(p) for p in paths] == [u.id for u in units for _ in u.inputs]
    shards = UnitIndex("shards", [Unit(id="s1", inputs=["bucket/in/s1.tar"], output="bucket/out/s1.tar")])
    assert shards("s3://bucket/in/s1.tar") == "s1"


# --------------------------------------------------------------------------- the stages, in one process


def batch_of(samples: list[dict]) -> pa.Table:
    from pipeline.io.samples import Normalizer
    from pipeline.io.webdataset import sample_row

    rows = [sample_row(s["__key__"], "/in/shard.tar", {k: v for k, v in s.items() if k != "__key__"}) for s in samples]
    return pa.Table.from_pylist(rows, schema=Normalizer(with_members=True).schema())


@pytest.fixture(scope="module")
def record():
    return RunRecord(run_id="run-test", config=ProtectConfig(method="sds-", eps=EPS, step_size=2, steps=2),
                     model=ModelSpec("tiny", device="cpu", dtype="fp32"))


def test_stages_give_the_bytes_protect_encoded_gives(tiny_models, record, tmp_path):
    """Decoder -> ProtectActor -> Encoder (as Ray runs them) == protect_encoded (the Python API)."""
    from test_protect_folder import awkward_inputs  # tests/test_protect_folder.py

    from pipeline.io.samples import Normalizer

    rows = [{"key": name.replace(".", "_"), "source": "/in/shard.tar", "image": data, "ext": name.rsplit(".", 1)[1],
             "meta": None, "member_names": [], "member_data": []} for name, data in awkward_inputs().items()]
    batch = pa.Table.from_pylist(rows, schema=Normalizer(with_members=True).schema())
    unit = Unit(id="shard", inputs=["/in/shard.tar"], output=str(tmp_path / "shard.tar"))
    decoded = Decoder(UnitIndex("shards", [unit]))(batch)
    actor = ProtectActor(record.model, record.config)
    protected = actor(decoded)
    assert "image" not in protected.column_names  # the source bytes never reach the actor
    encoded = Encoder(record.config.eps)(protected)

    expected = protect_encoded(build_protector(tiny_models, record.config), [r["key"] for r in rows],
                               [r["image"] for r in rows])
    for got, want in zip(encoded.to_pylist(), expected):
        assert got["key"] == want.key
        assert got["stage"] == want.stage, (got["key"], got["reason"], want.error)
        if want.error:
            continue
        assert got["data"] == want.data, got["key"]  # byte for byte
        assert got["linf"] == want.metrics["linf"] and got["width"] == want.metrics["width"]


def test_worker_parts_committed_by_commit_unit(record, tmp_path):
    """Writer (a worker's job) writes a part per unit and batch; commit_unit makes the shard, tables, marker."""
    out_fs, out_root = pafs.LocalFileSystem(), str(tmp_path / "out")
    samples = photo_samples(5, sizes=((64, 64),))
    unit = Unit(id="shard-000000", inputs=["/in/shard.tar"], output=f"{out_root}/shard-000000.tar")
    writer = Writer("shards", out_fs, out_root, {unit.id: unit.output}, record.sample_params(), record.run_id)
    rows = []
    for chunk in (samples[:3], samples[3:]):  # two writer batches -> two parts
        encoded = Encoder(EPS)(ProtectActor(record.model, record.config)(
            Decoder(UnitIndex("shards", [unit]))(batch_of(chunk))))
        rows += writer(encoded).to_pylist()
    assert set(pa.Table.from_pylist(rows).column_names) == set(RESULT_SCHEMA.names)  # small rows: no bytes
    parts = list(dict.fromkeys(r["part"] for r in rows))
    assert len(parts) == 2 and all(p.startswith(parts_dir(out_root, unit.id)) for p in parts)

    result = UnitResult(unit, parts=parts)
    for r in rows:
        result.counts.samples += 1
        result.counts.written += 1
        result.metrics.append(record.metric_row(r["key"], r["source"], r["output"], r["format"],
                                                {k: r[k] for k in ("width", "height", "linf", "psnr", "ssim", "lpips",
                                                                   "seconds", "device", "warnings")}))
    assert committed(out_fs, out_root, [unit]) == set()
    commit_unit(out_fs, out_root, "shards", result, record.run_id)
    assert committed(out_fs, out_root, [unit]) == {unit.id}
    with tarfile.open(unit.output) as tar:
        names = tar.getnames()
    assert names[::2] == [f"{s['__key__']}.png" for s in samples]  # input order, image then json
    assert not (tmp_path / "out" / "tables" / "_parts" / unit.id).exists()  # staging cleaned up
    import pyarrow.parquet as pq

    metrics = pq.read_table(f"{out_root}/tables/protect_metrics/{unit.id}.parquet").to_pylist()
    assert [m["key"] for m in metrics] == [s["__key__"] for s in samples]
    assert {(m["seed"], m["init"], m["resolution"]) for m in metrics} == {(0, "random", "auto")}


# --------------------------------------------------------------------------- typed settings


def test_settings_are_validated_when_built():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        ProtectConfig(method="nope")
    with pytest.raises(ValueError, match="unknown dtype"):
        ModelSpec("tiny", dtype="fp8")
    with pytest.raises(ValueError, match="unknown device"):
        ModelSpec("tiny", device="gpu0")
    from pipeline.batch.settings import RunSettings

    with pytest.raises(TypeError, match="ModelSpec"):
        RunSettings(input="a", output="b", model="tiny")
    with pytest.raises(TypeError, match="spec holds"):
        load_models(ModelSpec("tiny"), device="cpu")


def test_bad_method_fails_once_before_ray(tmp_path, capsys, monkeypatch):
    import ray

    from pipeline.batch import driver as ray_pipeline
    from pipeline.cli import main

    def no_ray(*a, **k):
        raise AssertionError("Ray was started for a run that cannot start")

    monkeypatch.setattr(ray_pipeline, "ensure_ray", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "shard-000000.tar").write_bytes(shard_bytes(photo_samples(1)))
    code = main(["protect", str(tmp_path / "in"), str(tmp_path / "out"), "--model", "tiny", "--method", "nope"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("unknown method") == 1 and err.strip().count("\n") == 0, err
    assert not (tmp_path / "out").exists()


def test_command_line_beats_config_file_even_at_the_default(tmp_path):
    from pipeline.commands.protect import parse_settings

    config = tmp_path / "job.yaml"
    config.write_text("input: /data/in\noutput: /data/out\neps: 4\nsteps: 7\nmodel: tiny\ndevice: cpu\nmethod: advdm\n")
    s = parse_settings(["--config", str(config), "--eps", "16", "--method", "sds-"])  # both equal the defaults
    assert (s.config.eps, s.config.method) == (16.0, "sds-")
    assert s.config.steps == 7 and s.model == ModelSpec("tiny", device="cpu")  # the file fills the rest
    s = parse_settings(["/x/in", "/x/out", "--config", str(config)])
    assert (s.input, s.output, s.config.eps, s.config.method) == ("/x/in", "/x/out", 4.0, "advdm")


def test_loading_a_bank_does_not_import_training():
    code = ("import sys, pipeline.protect.fastprotect.bank, pipeline.protect.fastprotect.infer; "
            "assert 'pipeline.protect.fastprotect.train' not in sys.modules, 'train imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_api(tiny_models):
    """The README's API: perturbations for uint8 H x W x 3 arrays, within the budget."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    protector = build_protector(tiny_models, ProtectConfig(method="sds-", eps=16, steps=2))
    deltas = protector.protect(images, ["a", "b"])
    assert [d.shape for d in deltas] == [i.shape for i in images]
    assert max(np.abs(d).max() for d in deltas) <= 16 and min(np.abs(d).max() for d in deltas) > 0
    again = build_protector(ModelSpec("tiny", device="cpu", dtype="fp32").load(), ProtectConfig(method="sds-", eps=16, steps=2))
    np.testing.assert_array_equal(again.protect(images[:1], ["a"])[0], deltas[0])  # per-key seeds: batch-independent


def test_every_image_member_of_a_sample_is_protected_through_the_stages(record, tmp_path):
    """A sample with a PNG, a JPEG and a PNG found by content (``.preview``): Decoder -> ProtectActor ->
    Encoder protects each in its own format under the same key; with --jpeg-as png the JPEG member
    would become ``png``, which the sample already has: it is written ``jpg.png``, never a duplicate."""
    from pipeline.io.images import decode_image
    from pipeline.io.sample_data import png_bytes
    from pipeline.io.samples import Normalizer
    from pipeline.io.webdataset import sample_row

    rgbs = [decode_image(s["png"]).rgb for s in photo_samples(3)]
    members = {"png": png_bytes(rgbs[0], "PNG"), "jpg": png_bytes(rgbs[1], "JPEG"), "preview": png_bytes(rgbs[2], "PNG"),
               "pkl": b"\x80\x04opaque"}
    batch = pa.Table.from_pylist([sample_row("k", "/in/shard.tar", members)],
                                 schema=Normalizer(with_members=True).schema())
    unit = Unit(id="shard", inputs=["/in/shard.tar"], output=str(tmp_path / "shard.tar"))
    protected = ProtectActor(record.model, record.config)(Decoder(UnitIndex("shards", [unit]))(batch))
    for jpeg_as, jpg_name in (("jpeg", "jpg"), ("png", "jpg.png")):
        (row,) = Encoder(record.config.eps, jpeg_as=jpeg_as)(protected).to_pylist()
        assert row["stage"] is None, row["reason"]
        written = dict(zip(row["member_names"], row["member_data"]))
        assert sorted(written) == sorted([jpg_name, "pkl", "preview"]) and written["pkl"] == members["pkl"]
        for name, clean, rgb in ((jpg_name, members["jpg"], rgbs[1]), ("preview", members["preview"], rgbs[2])):
            assert written[name] != clean and decode_image(written[name]).format == ("JPEG" if name == "jpg" else "PNG")
        assert [m["format"] for m in json.loads(row["more_metrics"])] == [jpg_name, "preview"]
        assert np.abs(decode_image(written["preview"]).rgb.astype(int) - rgbs[2]).max() <= EPS
