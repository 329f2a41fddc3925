"""Shared fixtures: offline built-in models, a real S3 endpoint on loopback, a local Ray."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the hub
os.environ.setdefault("MIMICSHIELD_CACHE", str(REPO / ".cache" / "mimicshield"))  # built-ins, built once
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray kills idle workers above one per CPU after a second, so each job of a test process would start (and import
# torch and the pipeline in) fresh workers again: keep them warm for the whole run (halves a small evaluation's time)
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", str(3600 * 1000))
if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2`: two test processes, one core each (the suite on 2 cores)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """The longest test files first (their seconds: tests/durations.py), each file's tests in their own order, so
    the two workers of `-n 2 --dist loadfile` finish together instead of one running a long file alone at the end."""
    from durations import load

    seconds, first_seen = load(), {}
    for item in items:
        first_seen.setdefault(item.path.name, len(first_seen))
    items.sort(key=lambda item: (-seconds.get(item.path.name, 0.0), first_seen[item.path.name]))


@pytest.fixture(scope="session")
def tiny_models():
    from pipeline.models.loading import load_models

    return load_models("tiny", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def photos_small() -> list[np.ndarray]:
    """Four real photos (scikit-image) at 32 x 32, uint8 (tests/helpers.py)."""
    from helpers import small_photos

    return small_photos()


@pytest.fixture(scope="module")
def protected(photos_small):
    """(models, **ProtectConfig fields) -> (protector, written uint8 images, results): the four small photos
    protected through `protect_encoded` once per module for each model and setting (tests/helpers.py,
    `protect_photos`), shared by the tests that only read them."""
    from helpers import protect_photos

    cache = {}

    def run(models, **config):
        key = (id(models), tuple(sorted(config.items())))  # the cached protector keeps `models` (and its id) alive
        if key not in cache:
            cache[key] = protect_photos(models, photos_small, **config)
        return cache[key]

    return run


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos bundled with scikit-image, as uint8 H x W x 3."""
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback (a separate thread; reachable from Ray workers).

    Yields a dict with the endpoint and credentials; also exports them as the standard AWS
    environment variables so boto3, pyarrow and Ray workers started afterwards find them.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    info = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "region_name": "us-east-1",
    }
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": info["endpoint_url"],
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield info
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server; yields its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", **s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray with 2 CPUs (started after the S3 env vars, so workers inherit them)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
