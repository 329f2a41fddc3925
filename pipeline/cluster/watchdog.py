"""The stall watchdog: a run that stops making progress says so, and (with a timeout) ends.

A scheduled job that hangs is worse than one that fails. The driver calls `tick()` whenever a sample
finishes; a daemon thread checks the time since the last tick:

- after `report_after(...)` seconds without one (10 x the run's own typical gap between samples, at
  least `MIN_REPORT_S`), it prints one line naming what Ray reports: free vs total resources and dead
  nodes (`ray_pending`), once per stall;
- after `timeout` seconds without progress (``--stall-timeout``; by default `auto_timeout`: 30 x the run's
  own pace, at least `AUTO_TIMEOUT_S`, so a scheduled job is never left waiting) it interrupts the
  driver, which ends the run with `STALL_EXIT` (committed units are kept: a rerun resumes);
- when a node of the cluster dies during the run, it says so in one line of ours, also when the run ends
  before the next look (Ray retries the node's tasks and restarts its actors; its own raylet dumps stay
  off the terminal unless ``--verbose``: cluster/logs.py `quiet_cluster_messages`); and when the pool no
  longer fits the live nodes (`replan`: cluster/pool.py `no_longer_fits`), Ray would wait for the lost node
  forever, so it ends the run the same way at once, saying why.
"""

from __future__ import annotations

import _thread
import signal
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable

MIN_REPORT_S = 120.0  # never report a stall sooner: model loading and the first batch take time
AUTO_TIMEOUT_S = 3600.0  # the default --stall-timeout never ends a run sooner (a model download, a huge first image)
STALL_EXIT = 4  # exit code of a run ended by --stall-timeout


class Stalled(RuntimeError):
    """The run made no progress for --stall-timeout seconds. str() says for how long and what Ray reported."""


STALL_SIGNAL = getattr(signal, "SIGUSR1", None)  # the watchdog's own signal (POSIX), never the user's Ctrl-C


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_main_thread() -> None:
    """KeyboardInterrupt in the main thread, even while it is blocked in a wait and whatever SIGINT's disposition.

    `_thread.interrupt_main` only sets a flag that the main thread reads when it next runs Python code (a
    thread blocked in a lock wait without timeout never does), and does nothing at all where SIGINT is
    ignored, as it is for every job a non-interactive shell starts in the background (``cmd &``, cron
    scripts): the run then hangs. While a `Watchdog` runs, STALL_SIGNAL raises KeyboardInterrupt in the main
    thread (`Watchdog.__enter__` installs the handler); a real signal also wakes a blocked wait.
    """
    if STALL_SIGNAL is not None and signal.getsignal(STALL_SIGNAL) is _raise_interrupt:
        signal.pthread_kill(threading.main_thread().ident, STALL_SIGNAL)
    else:
        _thread.interrupt_main()


def report_after(gaps, minimum: float = MIN_REPORT_S) -> float:
    """Seconds without progress that the run's own pace makes abnormal: 10 x its median gap, at least `minimum`."""
    return max(minimum, 10 * statistics.median(gaps)) if gaps else minimum


def live_node_ids() -> dict[str, str]:
    """node id -> address of the cluster's live nodes ({} when Ray cannot say)."""
    try:
        import ray

        return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
    except Exception:
        return {}


def ray_pending() -> str:
    """What Ray reports while the run waits: free vs total resources, dead nodes."""
    try:
        import ray

        total, free = ray.cluster_resources(), ray.available_resources()
        parts = [f"{name} {free.get(name, 0):g}/{total[name]:g} free" for name in ("CPU", "GPU") if total.get(name)]
        dead = [n.get("NodeManagerAddress", "?") for n in ray.nodes() if not n.get("Alive")]
        if dead:
            parts.append(f"dead node(s): {', '.join(dead)}")
        return "; ".join(parts) or "no resources reported"
    except Exception as err:  # the report must never be what breaks the run
        return f"Ray state unavailable ({type(err).__name__})"


def auto_timeout(gaps) -> float:
    """The default --stall-timeout: 30 x the run's median gap between samples, at least AUTO_TIMEOUT_S."""
    return max(AUTO_TIMEOUT_S, 30 * statistics.median(gaps)) if gaps else AUTO_TIMEOUT_S


class Watchdog:
    def __init__(self, timeout: float | None = None, log: Callable[[str], None] = print,
                 pending: Callable[[], str] = ray_pending, clock: Callable[[], float] = time.monotonic,
                 interrupt: Callable[[], None] = interrupt_main_thread, minimum: float = MIN_REPORT_S,
                 poll_s: float = 1.0, nodes: Callable[[], dict[str, str]] = live_node_ids, nodes_every_s: float = 10.0,
                 replan: Callable[[], str | None] | None = None):
        """`timeout`: seconds without progress that end the run (None: `auto_timeout`); `replan`: after a node is
        lost, why the pool can no longer run on the live nodes (None: it can)."""
        self.timeout, self.log, self.pending, self.clock, self.interrupt = timeout, log, pending, clock, interrupt
        self.replan = replan
        self.minimum, self.poll_s = minimum, poll_s
        self.last = clock()
        self.gaps: deque[float] = deque(maxlen=200)
        self.reported = False
        self.fired: str | None = None  # the reason, once the timeout ended the run
        self.nodes, self.nodes_every_s = nodes, nodes_every_s
        self.known_nodes: dict[str, str] | None = None
        self.nodes_checked = -float("inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_handler = None

    def tick(self) -> None:
        """A sample finished."""
        now = self.clock()
        self.gaps.append(now - self.last)
        self.last, self.reported = now, False

    def check(self) -> None:
        """One look (the thread calls it every `poll_s`; tests call it with a fake clock)."""
        now = self.clock()
        if now - self.nodes_checked >= self.nodes_every_s:
            self.nodes_checked = now
            self.check_nodes()
        idle = now - self.last
        if self.fired is not None:  # again, each look until the run ends: an interrupt that lands while the main
            self.interrupt()        # thread runs a finalizer is swallowed there ("Exception ignored in ...")
            return
        timeout = self.timeout if self.timeout is not None else auto_timeout(self.gaps)
        if idle >= timeout:
            given = (f"--stall-timeout {self.timeout:g}" if self.timeout is not None else
                     f"the default --stall-timeout: {timeout:.0f} s, 30x the run's pace, at least {AUTO_TIMEOUT_S:.0f}")
            self.fired = f"no sample finished for {idle:.0f} s ({given}); Ray: {self.pending()}"
            self.interrupt()
            return
        if not self.reported and idle >= report_after(self.gaps, self.minimum):
            self.reported = True
            self.log(f"mimicshield: no sample finished for {idle:.0f} s; Ray: {self.pending()}")

    def check_nodes(self, running: bool = True) -> None:
        """One line of ours for each node lost since the last look; while `running`, the run ends (`fired`) when
        the pool no longer fits the nodes left."""
        alive = self.nodes()
        lost = [] if self.known_nodes is None or not alive else \
            [(node_id, address) for node_id, address in self.known_nodes.items() if node_id not in alive]
        if alive:
            self.known_nodes = alive
        if not lost:
            return
        reason = self.replan() if running and self.replan is not None and self.fired is None else None
        for node_id, address in lost:
            self.log(f"mimicshield: lost Ray node {address} ({node_id[:8]}); Ray retries its tasks and restarts its "
                     f"actors elsewhere, {'the run goes on' if reason is None else 'but ' + reason}")
        if reason is not None:
            self.fired = f"lost Ray node(s) {', '.join(address for _, address in lost)}: {reason}"

    def __enter__(self) -> Watchdog:
        def loop():
            while not self._stop.wait(self.poll_s):
                self.check()

        self._old_handler = None
        if STALL_SIGNAL is not None and threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(STALL_SIGNAL, _raise_interrupt)  # restored by __exit__
        self._thread = threading.Thread(target=loop, name="mimicshield-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._old_handler is not None:
            signal.signal(STALL_SIGNAL, self._old_handler)
            self._old_handler = None
            self.check_nodes(running=False)  # a node lost since the last look is still reported
