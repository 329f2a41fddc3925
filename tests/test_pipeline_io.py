"""pipeline/io (storage, samples): URIs, brace patterns, listings, and read_samples over local and S3 shards."""

from __future__ import annotations

import json

import boto3
import pytest

from pipeline.io import storage as io
from pipeline.io.sample_data import photo_samples, shard_bytes
from pipeline.io.samples import read_samples


def test_expand_braces_keeps_padding_and_lists():
    assert io.expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
    assert io.expand_braces("{a,b}/x{1..2}") == ["a/x1", "a/x2", "b/x1", "b/x2"]
    assert io.expand_braces("plain.tar") == ["plain.tar"]


def test_s3_options_never_leak_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    public = io.S3Options.of({"region": "eu-west-1"}).public()
    assert public == {"endpoint_url": "http://127.0.0.1:9", "region": "eu-west-1"}
    assert "very-secret" not in json.dumps(public)
    assert "very-secret" not in repr(io.S3Options(access_key="k", secret_key="very-secret", session_token="very-secret"))
    with pytest.raises(io.InputError, match="unknown S3 option"):
        io.S3Options.of({"endpoint": "http://x"})  # a typo is an error, not a silent default


def test_folder_kind_and_listing_skip_tables(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"x")
    (tmp_path / "tables" / "errors").mkdir(parents=True)
    (tmp_path / "tables" / "errors" / "y.png").write_bytes(b"y")
    fs, path, kind = io.parse_uri(str(tmp_path))
    assert kind == "folder"
    assert io.list_images(fs, path) == [str(tmp_path / "a" / "x.png")]


def test_read_samples_local_and_s3(ray_local, s3_server, s3_bucket, tmp_path):
    samples = photo_samples(3)
    samples[0]["pkl"] = b"\x80\x04\x95 not a pickle anyone should load"
    data = shard_bytes(samples)
    (tmp_path / "shard-000000.tar").write_bytes(data)
    (tmp_path / "shard-000001.tar").write_bytes(shard_bytes(photo_samples(2, prefix="other")))
    boto3.client("s3", **s3_server).put_object(Bucket=s3_bucket, Key="in/shard-000000.tar", Body=data)

    local = read_samples(str(tmp_path / "shard-{000000..000001}.tar")).take_all()
    local = sorted(local, key=lambda r: r["key"])
    assert [r["key"] for r in local] == ["img00000", "img00001", "img00002", "other00000", "other00001"]
    assert {r["ext"] for r in local} == {"png"}
    assert json.loads(local[0]["meta"])["index"] == 0
    assert local[0]["image"] == samples[0]["png"]

    remote = sorted(read_samples(f"s3://{s3_bucket}/in/").take_all(), key=lambda r: r["key"])
    assert [r["key"] for r in remote] == ["img00000", "img00001", "img00002"]
    assert remote[0]["source"] == f"s3://{s3_bucket}/in/shard-000000.tar"
    assert set(remote[0]) == {"key", "source", "image", "ext", "meta", "prompt"}


def test_missing_bucket_and_shards_are_clear_errors(s3_server, s3_bucket):
    with pytest.raises(io.InputError, match="bucket not found"):
        io.parse_uri("s3://no-such-bucket-here/prefix/")
    fs, path, kind = io.parse_uri(f"s3://{s3_bucket}/x-{{0..2}}.tar")
    with pytest.raises(io.InputError, match="3 shard"):
        io.list_shards(fs, path)
