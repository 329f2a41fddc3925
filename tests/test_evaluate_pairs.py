"""Evaluation pairs each protected image with *its own* clean original, by key, and says what it left out.

Checked by value: every key gets a perturbation of its own size and its own group, so the table's
visibility PSNR for a group is the PSNR of that one pair, computed here from the pixels. Pairing an
image with itself (PSNR 100), or with another key's original, gives other numbers.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.evaluate.run import (
    annotate,
    both_sides,
    describe_unmatched,
    one_sided,
    pair_by_key,
)
from pipeline.evaluate.settings import EvalSettings
from pipeline.io.images import decode_image
from pipeline.io.metadata import sample_prompt
from pipeline.io.sample_data import photo_samples, png_bytes, shard_bytes

AMPLITUDES = {"img00000": 2, "img00001": 12, "img00002": 5}  # key -> +-amplitude of its perturbation


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Written here, not pipeline.metrics.visibility.psnr: the test checks the evaluation's PSNR against it."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255.0**2 / mse)


@pytest.mark.slow
def test_pairs_are_joined_by_key_and_one_sided_keys_are_reported(ray_local, tmp_path, capsys):
    clean = photo_samples(4)  # img00000 .. img00003; img00003 has no protected copy
    for s in clean:
        s["json"] = json.dumps({**json.loads(s["json"]), "artist": s["__key__"]}).encode()  # one group per key
    protected, expected = [], {}
    for i, s in enumerate(clean[:3]):
        rgb = decode_image(s["png"]).rgb
        sign = np.random.default_rng(i).choice([-1, 1], rgb.shape) * AMPLITUDES[s["__key__"]]
        prot = np.clip(rgb.astype(np.int64) + sign, 0, 255).astype(np.uint8)
        meta = {**json.loads(s["json"]), "mimicshield": {"method": "sds-", "eps": 12, "run_id": "r"}}
        protected.append({"__key__": s["__key__"], "png": png_bytes(prot), "json": json.dumps(meta).encode()})
        expected[s["__key__"]] = psnr(prot, rgb)
    protected.append({"__key__": "orphan", "png": clean[0]["png"], "json": b"{}"})  # no clean original
    # the shards list the samples in different orders, so a positional pairing would mismatch them
    (tmp_path / "prot").mkdir()
    (tmp_path / "clean").mkdir()
    (tmp_path / "prot" / "shard-000000.tar").write_bytes(shard_bytes(protected[::-1]))
    (tmp_path / "clean" / "shard-000000.tar").write_bytes(shard_bytes(clean))

    code = main(["evaluate", str(tmp_path / "prot"), "--clean", str(tmp_path / "clean"), "--output",
                 str(tmp_path / "eval"), "--scenario", "sdedit", "--model", "tiny", "--device", "cpu",
                 "--strengths", "0.5", "--ddim-steps", "1", "--samples-per-group", "0"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "1 protected sample(s) without a clean original (orphan)" in out.err  # progress notes: stderr, as protect
    assert "1 clean sample(s) without a protected copy (img00003)" in out.err

    (table,) = (tmp_path / "eval" / "tables" / "mimicry_metrics").glob("*.parquet")
    rows = pq.read_table(table).to_pylist()
    vis = {r["group"]: r for r in rows if r["scenario"] == "visibility" and r["metric"] == "psnr"}
    assert sorted(vis) == sorted(AMPLITUDES)  # neither one-sided key was evaluated
    for key, value in expected.items():
        assert vis[key]["value"] == pytest.approx(value, abs=1e-4), key
        assert vis[key]["n_images"] == 1 and vis[key]["method"] == "sds-"
    assert len({round(v, 2) for v in expected.values()}) == 3  # distinct values: a swap would show

    (record,) = (tmp_path / "eval" / "evaluations").glob("*.json")
    unmatched = json.loads(record.read_text())["unmatched"]
    assert unmatched == {"protected": {"count": 1, "keys": ["orphan"]}, "clean": {"count": 1, "keys": ["img00003"]}}


# --------------------------------------------------------------------------- the join's parts, without Ray


def tagged(*rows) -> pa.Table:
    """Rows as `_tagged` gives them: the prompt read from the metadata as the reader reads it."""
    return pa.Table.from_pylist([{"key": k, "role": role, "image": image, "meta": meta, "prompt": sample_prompt(meta)}
                                 for k, role, image, meta in rows],
                                schema=pa.schema([("key", pa.string()), ("role", pa.string()), ("image", pa.binary()),
                                                  ("meta", pa.string()), ("prompt", pa.string())]))


@pytest.mark.mutation
def test_pair_by_key_keeps_each_side_in_its_place():
    for order in ((0, 1), (1, 0)):  # whichever side the group lists first
        rows = [("k", "p", b"P", '{"a": 1, "prompt": "pp"}'), ("k", "c", b"C", '{"b": 2, "caption": "cc"}')]
        (joined,) = pair_by_key(tagged(*[rows[i] for i in order])).to_pylist()
        assert joined == {"key": "k", "p_image": b"P", "p_meta": rows[0][3], "p_prompt": "pp",
                          "c_image": b"C", "c_meta": rows[1][3], "c_prompt": "cc"}
    (only_p,) = pair_by_key(tagged(("x", "p", b"P", None))).to_pylist()
    assert (only_p["p_image"], only_p["c_image"]) == (b"P", None)
    (only_c,) = pair_by_key(tagged(("y", "c", b"C", None))).to_pylist()
    assert (only_c["key"], only_c["p_image"], only_c["c_image"]) == ("y", None, b"C")


@pytest.mark.mutation
def test_one_sided_and_both_sides_split_the_join():
    joined = pa.concat_tables([pair_by_key(tagged(*g)) for g in (
        [("both", "p", b"P", None), ("both", "c", b"C", None)],
        [("p-only", "p", b"P", None)],
        [("c-only", "c", b"C", None)],
        [("no-image", "p", None, None), ("no-image", "c", b"C", None)],  # a protected sample without an image
    )])
    assert both_sides(joined).column("key").to_pylist() == ["both"]
    assert one_sided(joined).to_pylist() == [{"key": "p-only", "side": "protected"}, {"key": "c-only", "side": "clean"},
                                             {"key": "no-image", "side": "clean"}]
    assert describe_unmatched({"protected": [], "clean": []}) is None
    text = describe_unmatched({"protected": ["a", "b", "c", "d"], "clean": ["z"]})
    assert text == ("not evaluated: 4 protected sample(s) without a clean original (a, b, c, ...); "
                    "1 clean sample(s) without a protected copy (z)")


@pytest.mark.mutation
def test_annotate_reads_group_method_eps_and_prompt_from_the_metadata():
    settings = EvalSettings(protected="s3://b/prot/", clean="c", output="o", group_by="artist")
    meta_p = json.dumps({"artist": "A", "prompt": "a castle", "mimicshield": {"method": "mist", "eps": 8, "run_id": "r1"}})
    batch = pa.Table.from_pylist([{**r, "p_prompt": sample_prompt(r["p_meta"]), "c_prompt": sample_prompt(r["c_meta"])}
                                  for r in [
        {"key": "k1", "p_image": b"P", "p_meta": meta_p, "c_image": b"C", "c_meta": json.dumps({"caption": "no"})},
        {"key": "k2", "p_image": b"P2", "p_meta": None, "c_image": b"C2", "c_meta": json.dumps({"artist": "B",
                                                                                                  "caption": "a cat"})},
        {"key": "k3", "p_image": b"P3", "p_meta": "[1]", "c_image": b"C3", "c_meta": None},
    ]])
    rows = annotate(batch, settings).to_pylist()
    assert [(r["key"], r["p_image"], r["c_image"]) for r in rows] == [("k1", b"P", b"C"), ("k2", b"P2", b"C2"),
                                                                     ("k3", b"P3", b"C3")]
    assert [(r["group"], r["method"], r["run"], r["prompt"]) for r in rows] == [
        ("A", "mist", "r1", "a castle"), ("B", "unknown", "prot", "a cat"), ("all", "unknown", "prot", "a photo")]
    assert rows[0]["eps"] == 8.0 and math.isnan(rows[1]["eps"])
    assert json.loads(rows[0]["meta"]) == {"caption": "no", "artist": "A", "prompt": "a castle"}
    assert len({r["group_id"] for r in rows}) == 3
    forced = annotate(batch, EvalSettings(protected="p", clean="c", output="o", method="sds-", eps=4, run="R"))
    assert {(r["method"], r["eps"], r["run"]) for r in forced.to_pylist()} == {("sds-", 4.0, "R")}
    # the run is the PROTECTED URI's last part ("run" when it has none), slashes and all
    for uri, run in (("s3://b/runX/", "runX"), ("/", "run"), ("out//", "out")):
        one = annotate(batch.slice(1, 1), EvalSettings(protected=uri, clean="c", output="o"))
        assert one.column("run").to_pylist() == [run], uri


@pytest.mark.mutation
def test_unknown_scenarios_are_refused_with_the_choices():
    from pipeline.evaluate.mimic import SCENARIOS

    with pytest.raises(ValueError) as err:
        EvalSettings(protected="p", clean="c", output="o", scenarios=("sdedit", "nope"))
    assert str(err.value) == f"unknown scenario(s) ['nope']; choose from {', '.join(SCENARIOS)}"
    assert EvalSettings(protected="p", clean="c", output="o", scenarios=("lora",)).scenarios == ("lora",)


def test_evaluate_takes_the_s3_options_of_protect_into_its_settings():
    from pipeline.cli import build_parser
    from pipeline.commands.evaluate import settings_from_args
    from pipeline.io.storage import S3Options, S3Retry

    def settings(*argv):
        return settings_from_args(build_parser().parse_args(["evaluate", "s3://b/prot/", "--clean", "s3://b/clean/",
                                                             "--output", "s3://b/eval/", *argv]))

    given = settings("--endpoint-url", "http://127.0.0.1:9000", "--region", "eu-west-1", "--s3-max-attempts", "3")
    assert given.s3 == S3Options(endpoint_url="http://127.0.0.1:9000", region="eu-west-1",
                                 retry=S3Retry(max_attempts=3))
    assert settings().s3 == S3Options()  # none given: the AWS environment, 10 attempts
