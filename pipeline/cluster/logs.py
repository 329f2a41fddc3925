"""What Ray prints on the user's terminal: quiet by default, everything with `--verbose`.

A protect run on a laptop should show one progress bar and a summary. Ray would add, unasked:

- its own INFO lines (``Starting execution of Dataset ...``, the execution plan) and, when stdout is
  not a terminal, a dump of every operator's state every 10 s (``logging_progress.py``);
- one progress bar per Ray Data operator;
- the stdout/stderr of every worker, forwarded to the driver (``log_to_driver``);
- the error messages the cluster publishes to every driver, printed whole: a lost node arrives as
  ``(raylet) Raylet is terminated ...`` followed by 20 lines of ``[state-dump]``;
- C++ ERROR lines of the core worker that are not errors for us, such as ``core_worker.cc: Actor with
  class name: 'MapWorker(...)' has constructor arguments in the object store and max_restarts > 0``
  (ray-project/ray#57733: Ray Data's own actors trigger it).

`quiet_ray(verbose)` turns these off before `ray.init` (the C++ level is read by each Ray process
when it starts, from ``RAY_BACKEND_LOG_LEVEL``; a value the user set is kept; in a local Ray this
also keeps the C++ INFO-ERROR lines out of Ray's log files). `init_ray` starts Ray with
`ray_init_options`, keeping the one line each C++ process prints about that level off the terminal
(replayed if `ray.init` fails), and then `quiet_cluster_messages` shortens the cluster's error messages
to one line each (a lost node's to none: the stall watchdog reports it in a line of ours).
`quiet_data_context` does the rest. Errors still reach the user: a failed task raises in the driver,
whose one-line reason the CLI prints (`cluster.session.short_error`). With `--verbose` nothing is
changed, and Ray's full logs are always under ``/tmp/ray/session_latest/logs/``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

QUIET_BACKEND_LEVEL = "fatal"  # C++ (raylet, core worker): only what stops a process
QUIET_PYTHON_LEVEL = logging.ERROR  # the "ray" and "ray.data" Python loggers


def quiet_ray(verbose: bool) -> None:
    """Before `ray.init`: keep Ray's C++ log lines off the terminal unless `verbose`."""
    if not verbose:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", QUIET_BACKEND_LEVEL)


def ray_init_options(verbose: bool) -> dict:
    """Keyword arguments for `ray.init` that set how much of Ray's output reaches the driver."""
    if verbose:
        return {"logging_level": logging.INFO, "log_to_driver": True}
    return {"logging_level": QUIET_PYTHON_LEVEL, "log_to_driver": False}


def quiet_data_context(ctx, verbose: bool, progress: bool = True) -> None:
    """Ray Data's own progress bars, start banner and INFO logs: only with `verbose` (bars: and `progress`)."""
    ctx.enable_progress_bars = verbose and progress
    ctx.print_on_execution_start = verbose
    # quiet: not even its ERROR lines about a failed task; the run's own one-line reason follows
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.CRITICAL)


@contextlib.contextmanager
def held_stderr(enabled: bool = True, replay_if=None):
    """Hold back what this process writes to file descriptor 2 (C++ included) while the block runs.

    The held text is dropped when the block succeeds and written to stderr when it raises (unless
    `replay_if(error)` says the caller explains that error better itself).
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException as err:
            sys.stderr.flush()
            os.dup2(saved, 2)
            if replay_if is None or replay_if(err):
                held.seek(0)
                os.write(2, held.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


NODE_LOST_MARKERS = ("Raylet is terminated", "has been marked dead")


def cluster_message_line(lines: list[str]) -> str | None:
    """What the terminal shows of one error message the cluster published (None: nothing).

    A lost node's message (the raylet's last 20 log lines) is dropped: the watchdog reports the node in
    a line of ours (cluster/watchdog.py). Any other message keeps its first line.
    """
    text = "\n".join(lines).strip()
    if not text or any(marker in text for marker in NODE_LOST_MARKERS):
        return None
    return "ray: " + text.splitlines()[0][:300]


def quiet_cluster_messages(verbose: bool) -> None:
    """After `ray.init`: the cluster's error messages reach this driver as one line each unless `verbose`.

    Ray prints them from a thread of its own (``listen_error_messages`` -> ``print_to_stdstream`` with
    ``pid="raylet"``) whatever ``log_to_driver`` says; this wraps that printer. If a future Ray moves it,
    nothing is wrapped and Ray prints as it always did.
    """
    if verbose:
        return
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_mimicshield_quiet", False):
        return

    def print_quietly(data, ignore_prefix):
        if isinstance(data, dict) and data.get("pid") == "raylet":
            line = cluster_message_line(list(data.get("lines") or []))
            if line:
                print(line, file=sys.stderr, flush=True)
            return
        original(data, ignore_prefix)

    print_quietly._mimicshield_quiet = True
    ray_worker.print_to_stdstream = print_quietly


def init_ray(address: str | None, verbose: bool, replay_if=None, **options):
    """`ray.init` with the terminal kept quiet unless `verbose` (see the module doc).

    `replay_if(error)`: whether Ray's held-back output is shown when `ray.init` fails (default: always).
    """
    import ray

    quiet_ray(verbose)
    with held_stderr(enabled=not verbose, replay_if=replay_if):
        context = ray.init(address=address, **ray_init_options(verbose), **options)
    quiet_cluster_messages(verbose)
    return context
