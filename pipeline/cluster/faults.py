"""`fault_point`: the one hook through which tests (and benchmarks) inject crashes.

A long job promises that a crash at any moment loses nothing and a rerun finishes the work. The code
calls `fault_point(point, subject)` at each place where a crash would leave a distinct state; with
``MIMICSHIELD_FAULT=<point>:<subject>`` in the environment of the process that reaches it, the call
raises `InjectedFault` (or, for `kill=True` points, SIGKILLs the process: no cleanup of any kind runs).
Without the variable it does nothing. The points:

    protect (driver, pipeline/batch/):
      mid-unit:<unit id>          the workers wrote part of this unit's output, nothing committed
      output-written:<unit id>    the unit's output is in place, no tables, no marker
      tables-written:<unit id>    output and tables in place, no marker
      committed:<unit id>         marker written (the unit is done)
      units-committed:<N>         after the N-th unit committed in this run
    protect (workers, batch/stages.py Writer; the driver's variable is handed to the workers):
      write-enospc:<sample key>   writing this sample's output file fails with ENOSPC (disk full)
    study (driver, pipeline/study/):
      cells-committed:<N>         after the N-th cell committed in this run (kills the process)
"""

from __future__ import annotations

import os
import signal
import sys

FAULT_ENV = "MIMICSHIELD_FAULT"


class InjectedFault(RuntimeError):
    """Raised on purpose by `fault_point` (FAULT_ENV) to test resuming after a crash."""


def fault_point(point: str, subject: str | int, kill: bool = False, error: BaseException | None = None,
                spec: str | None = None) -> None:
    """Crash here when FAULT_ENV is ``<point>:<subject>`` (see the module doc); else do nothing.

    `error`: raise this instead of `InjectedFault` (e.g. an ``OSError(ENOSPC)``); `spec`: the variable's
    value as the driver saw it, for code running in Ray workers (default: this process's environment).
    """
    spec = spec if spec is not None else os.environ.get(FAULT_ENV)
    if not spec or spec != f"{point}:{subject}":
        return
    if error is not None:
        raise error
    if kill:
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"{FAULT_ENV}={spec}: injected crash")
