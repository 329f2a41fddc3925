"""Fail fast: a GPU that is not there and a hub that cannot be reached are one message, at once."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from pipeline.cli import main
from pipeline.io.sample_data import photo_samples, shard_bytes
from pipeline.models.devices import device_problem
from pipeline.models.loading import ModelLoadError, ModelSpec


def test_device_problem_names_what_exists():
    assert device_problem("cpu", 0) is None and device_problem("auto", 0) is None
    assert device_problem("cuda", 1) is None and device_problem("cuda:1", 2) is None
    assert "no CUDA GPU" in device_problem("cuda", 0) and "--device cpu" in device_problem("cuda", 0)
    assert "no CUDA support" in device_problem("cuda:0", 0, cuda_built=False)
    beyond = device_problem("cuda:2", 2)
    assert "2 CUDA device(s)" in beyond and "cuda:0 to cuda:1" in beyond


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_gpu_fails_before_ray(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "shard-000000.tar").write_bytes(shard_bytes(photo_samples(1)))
    started = time.perf_counter()
    code = main(["protect", str(src), str(tmp_path / "out"), "--model", "tiny", "--device", "cuda", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - started < 30  # it used to wait for a GPU forever
    assert err.startswith("mimicshield: error: --device cuda: no CUDA GPU") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture
def silent_hub(monkeypatch):
    """An HF_ENDPOINT that accepts connections and never answers; yields the list of accepted connections."""
    import huggingface_hub.constants as hf_constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # read at import (conftest sets it for every test)
    yield accepted
    server.close()
    for conn in accepted:
        conn.close()


def test_hub_check_one_short_request_then_the_alternatives(silent_hub, monkeypatch):
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        ModelSpec("someone/some-model").check()
    assert time.perf_counter() - started < 6  # one 1 s timeout, not 25 s of retries
    assert len(silent_hub) == 1  # no retry storm
    text = str(err.value)
    assert "cannot reach the Hugging Face hub" in text and "within 1 s" in text
    assert "local diffusers directory" in text and "tiny" in text and "HF_HUB_OFFLINE=1" in text

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline and not cached: no request at all
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        ModelSpec("someone/some-model").check()
    assert len(silent_hub) == 1
