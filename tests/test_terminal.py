"""What a person sees: a per-image bar, a summary, one line while a built-in is generated, no Ray noise."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest

from pipeline.batch.progress import ImageProgress
from pipeline.cluster.logs import held_stderr, quiet_data_context, ray_init_options
from pipeline.io.sample_data import photo_samples

RAY_NOISE = ("INFO", "WARNING", "core_worker.cc", "logging_progress", "Set ray log level", "Writing model shards",
             "Traceback", "(pid=")


def test_image_progress_counts_images_not_units():
    out = io.StringIO()
    bar = ImageProgress(5, units=1, unit_name="chunks", file=out)
    for i in range(5):
        bar.sample(error=(i == 3))
    bar.unit_done()
    bar.close()
    assert (bar.images, bar.errors, bar.units_done) == (5, 1, 1)
    final = out.getvalue().split("\r")[-1]
    assert "5/5" in final and "1/1 chunks committed, 1 errors" in final
    silent = io.StringIO()
    ImageProgress(None, 2, "shards", enabled=False, file=silent).close()
    assert silent.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_count_progress_draws_only_in_a_terminal():
    from pipeline.batch.progress import CountProgress

    piped = io.StringIO()  # a log file or a pipe: no bar, the caller logs its lines instead
    with CountProgress(3, "study", "cell", file=piped) as bar:
        bar.add(1, note="sds-_eps8/jpeg-50/sdedit")
    assert piped.getvalue() == "" and not bar.shown and bar.done == 1
    term = Terminal()
    with CountProgress(3, "evaluating", "pair", file=term) as bar:
        bar.add(2)
        bar.add(1, note="last")
    assert bar.shown and "evaluating" in term.getvalue() and "3/3" in term.getvalue().split("\r")[-1]
    off = Terminal()
    CountProgress(3, "study", "cell", enabled=False, file=off).close()  # --no-progress
    assert off.getvalue() == ""


def test_ray_output_settings_quiet_by_default_verbose_brings_them_back():
    from ray.data import DataContext

    assert ray_init_options(False) == {"logging_level": logging.ERROR, "log_to_driver": False}
    assert ray_init_options(True)["log_to_driver"] is True
    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start)
    quiet_data_context(ctx, verbose=False)
    assert not ctx.enable_progress_bars and not ctx.print_on_execution_start
    assert logging.getLogger("ray.data").level == logging.CRITICAL  # not even a failed task's ERROR lines
    quiet_data_context(ctx, verbose=True)
    assert ctx.enable_progress_bars and ctx.print_on_execution_start
    assert logging.getLogger("ray.data").level == logging.INFO
    quiet_data_context(ctx, verbose=False)
    ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def test_held_stderr_drops_on_success_replays_on_failure(capfd):
    with held_stderr():
        os.write(2, b"C++ chatter\n")
    assert capfd.readouterr().err == ""
    with pytest.raises(RuntimeError):
        with held_stderr():
            os.write(2, b"why it failed\n")
            raise RuntimeError("init failed")
    assert capfd.readouterr().err == "why it failed\n"


@pytest.mark.slow
def test_cli_run_shows_a_bar_per_image_and_no_ray_noise(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for sample in photo_samples(3):
        (src / f"{sample['__key__']}.png").write_bytes(sample["png"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MIMICSHIELD_CACHE": str(tmp_path / "cache")}  # a first use
    for name in ("RAY_ADDRESS", "RAY_BACKEND_LOG_LEVEL"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "protect", str(src), str(tmp_path / "out"),
                           "--model", "tiny", "--steps", "2", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "3 samples in, 3 protected, 0 errors" in proc.stdout
    err = proc.stderr
    assert err.count("generating built-in model tiny (first use") == 1
    assert "3/3" in err  # the bar counts images (a 3-image folder: not 0/1)
    assert "img" in err and "1/1 chunks committed" in err
    noise = [line for line in err.replace("\r", "\n").splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noise, noise


def test_the_clusters_error_messages_reach_the_terminal_as_one_line_and_a_lost_node_as_none():
    from pipeline.cluster.logs import cluster_message_line

    dump = ["Raylet is terminated. Termination is unexpected. Possible reasons include: (1) SIGKILL ...",
            "    [state-dump] NodeManager.ScheduleAndGrantLeases - 1 total", "    [state-dump] DebugString() time ms: 0"]
    assert cluster_message_line(dump) is None  # the watchdog reports the node in a line of ours
    assert cluster_message_line(["The node with node id: ab12 has been marked dead because the detector has missed "
                                 "too many heartbeats from it."]) is None
    oom = ["Task was killed due to the node running low on memory.", "Memory on the node (IP: 10.0.0.2) was 30 GB"]
    assert cluster_message_line(oom) == "ray: Task was killed due to the node running low on memory."
    assert cluster_message_line([]) is None


def test_held_stderr_keeps_what_the_caller_explains_itself(capfd):
    with pytest.raises(PermissionError):
        with held_stderr(replay_if=lambda err: not isinstance(err, PermissionError)):
            os.write(2, b"20 lines of retries\n")
            raise PermissionError("refused")
    assert "retries" not in capfd.readouterr().err


def test_a_driver_finds_the_token_where_rays_cli_looks(tmp_path, monkeypatch):
    from pipeline.cluster import session

    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert session.token_source() is None
    session.use_token_if_available()
    assert "RAY_AUTH_MODE" not in os.environ  # nothing to send: Ray's default (no token) stays
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("abc")
    assert session.token_source() == str(tmp_path / ".ray" / "auth_token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert session.token_source() is None  # an explicit path that does not exist is not silently replaced
    monkeypatch.setenv("RAY_AUTH_TOKEN", "xyz")
    assert session.token_source() == "RAY_AUTH_TOKEN"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    session.use_token_if_available()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"  # an explicit choice is kept
    assert "sent no token" in session.auth_advice("10.0.0.5:6379")


def test_auth_refusal_is_recognised_through_rays_wrapping():
    from pipeline.cluster.session import auth_refused

    class AuthenticationError(Exception):
        pass

    try:
        try:
            raise AuthenticationError("RPC error: InvalidAuthToken: Authentication token is missing or incorrect")
        except AuthenticationError as inner:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379") from inner
    except ConnectionError as err:
        assert auth_refused(err)
    assert not auth_refused(ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379"))
