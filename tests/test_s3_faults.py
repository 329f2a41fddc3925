"""S3 faults: transient ones are retried and lose or duplicate nothing; bad credentials fail once, clearly.

Real parts: the moto server (conftest) behind a fault-injecting proxy on loopback (tests/s3_fault_proxy.py)
that answers 503 SlowDown, resets connections before and after the server saw the request; and a
second moto server in auth mode (``INITIAL_NO_AUTH_ACTION_COUNT``), where unknown keys get 403.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time

import boto3
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs
from s3_fault_proxy import FaultProxy
from test_pipeline_protect import tar_samples

from pipeline.batch.driver import run_protect
from pipeline.batch.settings import RunSettings
from pipeline.cli import main
from pipeline.io.sample_data import photo_samples, shard_bytes
from pipeline.io.storage import (
    RetryingS3FileSystem,
    S3Retry,
    read_small_file,
    s3_filesystem,
)
from pipeline.models.loading import ModelSpec
from pipeline.protect import ProtectConfig


def test_s3_retry_settings_are_validated_and_survive_pickling():
    with pytest.raises(ValueError, match="s3-max-attempts"):
        S3Retry(max_attempts=0)
    fs = s3_filesystem({"endpoint_url": "http://127.0.0.1:9", "access_key": "k", "secret_key": "s"},
                       S3Retry(max_attempts=7, connect_timeout_s=2))
    copy = pickle.loads(pickle.dumps(fs))  # what a Ray worker gets: pyarrow alone would drop retry_strategy
    assert isinstance(copy, RetryingS3FileSystem) and isinstance(copy, pafs.S3FileSystem)
    assert copy.retry == S3Retry(max_attempts=7, connect_timeout_s=2)
    assert copy.__reduce__()[1][1]["endpoint_override"] == "127.0.0.1:9"
    with pytest.raises(TypeError, match="S3Retry"):
        RunSettings(input="a", output="b", s3={"retry": {"max_attempts": 3}})  # typed, never a dict


def test_a_worker_copy_of_the_client_keeps_its_retries(s3_server, s3_bucket):
    """Through a proxy that faults every request once: 1 attempt fails, 10 survive, also after pickling."""
    with FaultProxy(s3_server["endpoint_url"], every=1) as proxy:
        def worker_copy(attempts):  # what a Ray task gets (pyarrow's own pickling would reset it to 3)
            return pickle.loads(pickle.dumps(s3_filesystem({"endpoint_url": proxy.url}, S3Retry(max_attempts=attempts))))

        with pytest.raises(OSError):
            with worker_copy(1).open_output_stream(f"{s3_bucket}/once") as f:
                f.write(b"x")
        fs = worker_copy(10)
        # (4 KiB: the AWS SDK writes an error body into the read's own buffer; a 503 on a ranged read smaller
        # than the ~200-byte SlowDown XML fails as non-retried INTERNAL_FAILURE; see README, S3 faults)
        payload = bytes(range(256)) * 16
        with fs.open_output_stream(f"{s3_bucket}/retried") as f:
            f.write(payload)
        assert fs.open_input_file(f"{s3_bucket}/retried").read() == payload
    assert proxy.counts["slowdown"] + proxy.counts["reset"] + proxy.counts["reset_after"] >= 3


def test_a_503_on_a_small_read_is_retried_too(s3_server, s3_bucket):
    """The SDK does not retry a 503 whose XML body is larger than the read (a 180-byte resume marker)."""
    marker = b'{"unit": "shard-000000", "inputs_digest": "' + b"0" * 120 + b'"}'
    boto3.client("s3", **s3_server).put_object(Bucket=s3_bucket, Key="small.json", Body=marker)

    class SlowDownOnEveryFirstGet(FaultProxy):
        def _decide(self, method, path, range_):
            fault = super()._decide(method, path, range_)
            return fault and ("slowdown" if method == "GET" else None)

    with SlowDownOnEveryFirstGet(s3_server["endpoint_url"], every=1) as proxy:
        fs = s3_filesystem({"endpoint_url": proxy.url})
        with pytest.raises(OSError, match="Failed to flush response stream"):
            with fs.open_input_stream(f"{s3_bucket}/small.json") as f:  # what pyarrow alone does
                f.read()
        proxy._seen.clear()
        assert read_small_file(fs, f"{s3_bucket}/small.json") == marker


@pytest.mark.slow
def test_transient_faults_are_retried_nothing_lost_or_duplicated(ray_local, s3_server, s3_bucket):
    client = boto3.client("s3", **s3_server)
    shards = [photo_samples(2, prefix=f"f{i}-") for i in range(2)]
    for i, samples in enumerate(shards):
        client.put_object(Bucket=s3_bucket, Key=f"in/shard-{i:06d}.tar", Body=shard_bytes(samples))

    with FaultProxy(s3_server["endpoint_url"], every=3) as proxy:
        summary = run_protect(RunSettings(
            input=f"s3://{s3_bucket}/in/", output=f"s3://{s3_bucket}/out/", s3={"endpoint_url": proxy.url},
            config=ProtectConfig(steps=2, step_size=2, eps=8), model=ModelSpec("tiny", device="cpu", dtype="fp32"),
            progress=False))
    print("faults injected:", proxy.counts)
    # every kind of fault happened, in the driver (listings, tables, markers) and in the workers (reads, parts)
    assert proxy.counts["slowdown"] and proxy.counts["reset"] and proxy.counts["reset_after"], proxy.counts
    assert (summary.samples_in, summary.samples_written, summary.errors) == (4, 4, 0)

    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"])
    assert [k for k in keys if k.endswith(".tar")] == ["out/shard-000000.tar", "out/shard-000001.tar"]
    assert not [k for k in keys if "/_parts/" in k and not k.endswith("/")]  # staging emptied (a folder marker stays)
    for i, samples in enumerate(shards):
        written = tar_samples(client.get_object(Bucket=s3_bucket, Key=f"out/shard-{i:06d}.tar")["Body"].read())
        assert list(written) == [s["__key__"] for s in samples]  # each key once, in order
    s3 = pafs.S3FileSystem(endpoint_override=s3_server["endpoint_url"].split("//")[1], scheme="http",
                           region="us-east-1", access_key="testing", secret_key="testing")
    metrics = pq.read_table(f"{s3_bucket}/out/tables/protect_metrics", filesystem=s3).to_pylist()
    assert sorted(r["key"] for r in metrics) == sorted(s["__key__"] for v in shards for s in v)  # no duplicate rows
    (run,) = pq.read_table(f"{s3_bucket}/out/tables/runs", filesystem=s3).to_pylist()
    assert run["status"] == "completed" and run["samples_written"] == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def auth_s3():
    """A moto server in auth mode: its first 2 requests are free (bucket, shard), then keys are checked."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=url, aws_access_key_id="setup", aws_secret_access_key="setup",
                              region_name="us-east-1")
        client.create_bucket(Bucket="guarded")
        client.put_object(Bucket="guarded", Key="in/shard-000000.tar", Body=shard_bytes(photo_samples(1)))
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bad_credentials_one_message_nonzero_exit_secret_never_printed(auth_s3, tmp_path, capfd, monkeypatch):
    secret = "wJalrXUtnFEMI-not-a-real-secret-7f3a"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKE1234")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    code = main(["protect", "s3://guarded/in/", str(tmp_path / "out"), "--endpoint-url", auth_s3,
                 "--model", "tiny", "--steps", "2", "--no-progress", "--s3-max-attempts", "3"])
    out = capfd.readouterr()
    text = out.out + out.err
    assert code == 2
    assert secret not in text and "AKIAFAKEFAKEFAKE1234" not in text
    (line,) = [line for line in text.splitlines() if line.strip()]  # one message, no traceback
    assert line.startswith("mimicshield: error: INPUT s3://guarded/in/: access denied to bucket guarded") \
        and "credentials" in line
    assert not (tmp_path / "out").exists()
