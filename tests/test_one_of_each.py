"""One implementation per concept: the bugs the copies made, each pinned by a test.

- a sample's prompt: protection, evaluation and the study read it the same way (JSON, then `.txt`);
- the study passes every protect option it accepts on to the protect run (nothing dropped);
- the resume fingerprint is derived from the settings objects, with device and dtype resolved;
- evaluation loads the mimic model at its pinned revision.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from pipeline.batch.settings import RunSettings
from pipeline.cli import build_parser
from pipeline.evaluate.settings import EvalSettings
from pipeline.io.metadata import sample_prompt
from pipeline.io.sample_data import photo_samples, shard_bytes
from pipeline.models.loading import ModelSpec, pretrained_source
from pipeline.protect import ProtectConfig

CAPTION = "a watercolour of a fox, in the style of A"


# ---------------------------------------------------------------- a sample's prompt


def captioned_shard(tmp_path, folder: str, json_prompt: str | None = None):
    samples = photo_samples(2, prefix="s")
    samples[0]["json"] = b'{"artist": "A"}'
    samples[0]["txt"] = CAPTION.encode()  # captioned by a .txt member only
    if json_prompt:
        samples[1]["json"] = f'{{"prompt": "{json_prompt}"}}'.encode()
        samples[1]["txt"] = b"ignored: the JSON prompt wins"
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "shard-000000.tar").write_bytes(shard_bytes(samples))
    return str(tmp_path / folder)


def test_sample_prompt_reads_json_then_caption_then_txt():
    assert sample_prompt('{"prompt": "p", "caption": "c"}', b"t") == "p"
    assert sample_prompt('{"caption": "c"}', b"t") == "c"
    assert sample_prompt('{"prompt": "  "}', b" t \n") == "t"
    assert sample_prompt(None, None) is None and sample_prompt("[1]", b"") is None


def test_a_txt_caption_reaches_protection_evaluation_and_the_study(ray_local, tmp_path):
    """The same prompt column feeds the protect stages, the evaluation pairs and the study's samples."""
    from pyarrow import fs as pafs

    from pipeline.batch.commit import Unit, UnitIndex
    from pipeline.batch.stages import Decoder
    from pipeline.evaluate.run import PAIR_SCHEMA, annotate, build_pairs
    from pipeline.io.samples import Normalizer, read_samples
    from pipeline.io.webdataset import read_shard
    from pipeline.study import adapter

    clean = captioned_shard(tmp_path, "clean", json_prompt="a castle")
    protected = captioned_shard(tmp_path, "prot", json_prompt="a castle")
    expected = {"s00000": CAPTION, "s00001": "a castle"}

    # protection: the decoder hands the actors the reader's prompt
    rows = list(read_shard(pafs.LocalFileSystem(), f"{clean}/shard-000000.tar"))
    unit = Unit(id="shard-000000", inputs=[f"{clean}/shard-000000.tar"], output=str(tmp_path / "o.tar"))
    decoded = Decoder(UnitIndex("shards", [unit]))(pa.Table.from_pylist(rows, schema=Normalizer(with_members=True).schema()))
    assert dict(zip(decoded.column("key").to_pylist(), decoded.column("prompt").to_pylist())) == expected

    # evaluation: the pairs carry it, and annotate uses it before --prompt
    settings = EvalSettings(protected=protected, clean=clean, output=str(tmp_path / "eval"), prompt="a photo")
    annotated = annotate(pa.Table.from_pylist(build_pairs(settings).take_all(), schema=PAIR_SCHEMA), settings)
    assert dict(zip(annotated.column("key").to_pylist(), annotated.column("prompt").to_pylist())) == expected

    # the study: the encoded clean set carries it to the cell workers
    encoded = adapter.read_encoded(clean, None)
    assert {k: v[2] for k, v in encoded.items()} == expected
    assert {r["key"]: r["prompt"] for r in read_samples(clean).take_all()} == expected


# ---------------------------------------------------------------- study: no option dropped


def test_study_passes_every_protect_option_on(tmp_path):
    from pipeline.commands.study import settings_from_args
    from pipeline.study import adapter
    from pipeline.study.grid import Source

    argv = ["study", str(tmp_path / "clean"), str(tmp_path / "out"), "--model", "tiny", "--methods", "sds-,mist+eot",
            "--eps", "4,8", "--jpeg-as", "png", "--s3-max-attempts", "3", "--on-bad-shard", "fail", "--overwrite",
            "--verbose", "--steps", "7", "--step-size", "0.5", "--seed", "5", "--max-pixels", "1000", "--chunk-size",
            "9", "--batch-size", "3", "--resolution", "48", "--revision", "abc123", "--eot-samples", "2",
            "--actors", "2", "--no-progress"]
    args = build_parser().parse_args(argv)
    args._argv = argv[1:]
    settings = settings_from_args(args)
    run = adapter.protect_settings(settings, Source("mist+eot", 8.0), str(tmp_path / "out" / "protected" / "x"))
    assert isinstance(run, RunSettings)
    assert (run.jpeg_as, run.s3.retry.max_attempts, run.on_bad_shard, run.overwrite, run.verbose) == \
        ("png", 3, "fail", True, True)
    assert (run.max_pixels, run.chunk_size, run.batch_size, run.progress) == (1000, 9, 3, False)
    assert (run.config.method, run.config.eps, run.config.steps, run.config.step_size, run.config.seed,
            run.config.resolution, run.config.eot_samples) == ("mist", 8.0, 7, 0.5, 5, "48", 2)
    assert run.config.eot  # NAME+eot: the study's transforms
    assert (run.model.model, run.model.revision) == ("tiny", "abc123")
    assert run.input == str(tmp_path / "clean") and run.output.endswith("protected/x")
    plain = adapter.protect_settings(settings, Source("sds-", 4.0), "o")
    assert (plain.config.method, plain.config.eot, plain.config.eot_samples) == ("sds-", "", 1)
    # one model, held once: the mimics use the protect run's model (revision included)
    assert settings.evaluation.model is settings.protect.model and settings.model.revision == "abc123"
    assert settings.actors == 2 and run.actors is None  # --actors sizes the study's cell actors


# ---------------------------------------------------------------- the resume fingerprint


def run_settings(**config) -> RunSettings:
    return RunSettings(input="in", output="out", config=ProtectConfig(**config), model=ModelSpec("tiny"))


def test_fingerprint_resolves_dtype_and_device_for_the_actors_hardware():
    s = run_settings()
    on_gpu, on_cpu = s.fingerprint(gpus=1), s.fingerprint(gpus=0)
    assert (on_gpu["device"], on_gpu["dtype"]) == ("cuda", "fp16")
    assert (on_cpu["device"], on_cpu["dtype"]) == ("cpu", "fp32")
    explicit = RunSettings(input="in", output="out", model=ModelSpec("tiny", dtype="bf16"))
    assert explicit.fingerprint(gpus=1)["dtype"] == "bf16"
    cpu_only = RunSettings(input="in", output="out", model=ModelSpec("tiny", device="cpu"))
    assert cpu_only.fingerprint(gpus=4)["device"] == "cpu"  # --device cpu on a GPU cluster stays on CPU


def test_fingerprint_holds_what_changes_bytes_and_nothing_else():
    base = run_settings().fingerprint(gpus=0)
    for change in (dict(steps=3), dict(eps=8.0), dict(seed=1), dict(prompt="x"), dict(eot="jpeg:50-95")):
        assert run_settings(**change).fingerprint(gpus=0) != base, change
    assert run_settings(fastprotect={"bank": "b.safetensors"}).fingerprint(gpus=0)["fastprotect.bank"] == "b.safetensors"
    same = dataclasses.replace(run_settings(), batch_size=16, actors=3, chunk_size=8, progress=False, verbose=True,
                               model=ModelSpec("tiny", low_memory=True))
    assert same.fingerprint(gpus=0) == base
    assert dataclasses.replace(run_settings(), jpeg_as="png").fingerprint(gpus=0) != base


def test_a_new_protect_config_field_is_in_the_fingerprint_without_being_listed():
    Extended = dataclasses.make_dataclass("Extended", [("new_knob", int, dataclasses.field(default=3))],
                                          bases=(ProtectConfig,))
    s = RunSettings(input="in", output="out", config=Extended(), model=ModelSpec("tiny"))
    assert s.fingerprint(gpus=0)["new_knob"] == 3
    assert dataclasses.replace(s, config=Extended(new_knob=4)).fingerprint(gpus=0)["new_knob"] == 4


# ---------------------------------------------------------------- evaluation: the pinned revision


def test_evaluation_holds_a_model_spec_and_loads_its_revision(monkeypatch):
    import diffusers

    from pipeline.commands.evaluate import settings_from_args
    from pipeline.evaluate.mimic import SDEdit

    args = build_parser().parse_args(["evaluate", "prot", "--clean", "c", "--output", "o", "--model", "owner/model",
                                      "--revision", "abc123", "--device", "cpu", "--dtype", "fp32"])
    settings = settings_from_args(args)
    assert settings.model == ModelSpec("owner/model", revision="abc123", device="cpu", dtype="fp32")
    assert pretrained_source(settings.model) == ("owner/model", {"revision": "abc123"})
    assert pretrained_source(ModelSpec("tiny"))[1] == {}  # built-ins and local folders take no revision

    class Loaded(Exception):
        pass

    seen = {}

    def from_pretrained(path, **kwargs):
        seen.update(path=path, **kwargs)
        raise Loaded

    monkeypatch.setattr(diffusers.StableDiffusionImg2ImgPipeline, "from_pretrained", from_pretrained)
    with pytest.raises(Loaded):
        SDEdit(settings.model, settings.sdedit, settings.model.device, settings.model.dtype)  # what the actors do
    assert (seen["path"], seen["revision"]) == ("owner/model", "abc123")
    # no inpainting twin known: the same model, at the same revision; a twin (another repository) takes none
    assert settings.inpaint_spec == ModelSpec("owner/model", revision="abc123", device="cpu", dtype="fp32")
    assert EvalSettings(protected="p", clean="c", output="o", model=ModelSpec("tiny", revision=None)).inpaint_spec.model \
        == "tiny-inpaint"
