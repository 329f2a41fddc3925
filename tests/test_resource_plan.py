"""The resource plan (pipeline/cluster/pool.py): a pool of model actors never takes the CPU its tasks need.

Synthetic node lists check the rule without Ray (1, 2, 4 and 16 CPUs, mixed nodes, GPU nodes); then
`protect` on this machine's local Ray (2 CPUs) shows the refusal and the lowered share end to end.
"""

from __future__ import annotations

import itertools
import math

import pytest

from pipeline.cluster.pool import (
    MIN_SHARE,
    TASK_CPUS,
    Node,
    ResourcePlanError,
    plan_share,
)


def worst_case_free(nodes: list[Node], size: int, share: float, runs_tasks=None) -> bool:
    """Brute force: is there a placement of `size` actors (each `share` CPUs, where they fit) that leaves
    no node (of those that `runs_tasks`) with a task slot? True when every placement keeps one (safe)."""
    runs_tasks = runs_tasks or [True] * len(nodes)
    for placement in itertools.product(range(len(nodes)), repeat=size):
        used = [0.0] * len(nodes)
        ok = True
        for i in placement:
            used[i] += share
            if used[i] > nodes[i].cpus + 1e-9:
                ok = False
                break
        if ok and all(n.cpus - u < TASK_CPUS - 1e-9 for n, u, r in zip(nodes, used, runs_tasks) if r):
            return False
    return True


SMALL_CLUSTERS = [[Node(1)], [Node(2)], [Node(4)], [Node(1), Node(1)], [Node(2), Node(1)], [Node(4), Node(4)],
                  [Node(2), Node(2), Node(1)]]


@pytest.mark.parametrize("nodes", SMALL_CLUSTERS, ids=lambda ns: "+".join(f"{n.cpus:g}" for n in ns))
@pytest.mark.parametrize("actors", [1, 2, 3, 4, 6])
def test_every_accepted_plan_keeps_a_task_slot_however_ray_places_the_actors(nodes, actors):
    try:
        share = plan_share("cpu", actors, nodes)
    except ResourcePlanError as err:
        # refused: then no share down to the minimum is safe, and the advice is right
        assert not worst_case_free(nodes, actors, MIN_SHARE) or actors > sum(math.floor(n.cpus / MIN_SHARE) for n in nodes)
        fit = int(str(err).rsplit(" ", 1)[1]) if "largest --actors that fits is" in str(err) else 0
        if fit:
            assert worst_case_free(nodes, fit, MIN_SHARE) and plan_share("cpu", fit, nodes).size == fit
        assert "\n" not in str(err)
        return
    assert share.size == actors and share.num_cpus >= MIN_SHARE
    assert worst_case_free(nodes, actors, share.num_cpus), (nodes, actors, share)


def test_the_cases_that_hung():
    # 4 actors on a 2-core laptop: each took 0.5 CPU, nothing was left for the tasks; now a quarter each
    laptop = plan_share("cpu", 4, [Node(2)])
    assert laptop.num_cpus == 0.25 and laptop.note and "CPU stays free" in laptop.note
    with pytest.raises(ResourcePlanError, match="the largest --actors that fits is 4"):
        plan_share("cpu", 5, [Node(2)])
    # two 1-CPU nodes, 2 actors: each node kept 0.5 CPU and no 1-CPU task fitted anywhere
    with pytest.raises(ResourcePlanError, match="--actors 2 cannot run .* 2 node.s. with 1, 1 CPU.*fits is 1"):
        plan_share("cpu", 2, [Node(1), Node(1)])
    # 8 actors on two 4-CPU nodes
    eight = plan_share("cpu", 8, [Node(4), Node(4)])
    assert worst_case_free([Node(4), Node(4)], 8, eight.num_cpus)


def test_defaults_are_unchanged_where_they_were_safe():
    assert plan_share("cpu", None, [Node(2)]).num_cpus == 1.0  # one actor, one CPU, one CPU for the tasks
    assert plan_share("cpu", 2, [Node(2)]).num_cpus == 0.5
    big = plan_share("cpu", 3, [Node(16)])
    assert big.num_cpus == 5.0 and big.threads == 5 and big.note is None
    study = plan_share("cpu", None, [Node(8)], default_cpu_actors=4, spread_threads=True)
    assert (study.size, study.threads) == (4, 2)


def test_gpu_pools():
    gpu = plan_share("auto", None, [Node(8, gpus=4), Node(8, gpus=4)])
    assert (gpu.size, gpu.gpu, gpu.actor_options()) == (8, True, {"num_gpus": 1, "num_cpus": 1.0})
    assert plan_share("cpu", None, [Node(8, gpus=4)]).gpu is False  # --device cpu stays on CPU
    # a GPU node whose GPUs could hold all its CPUs, and no CPU-only node: the actors would starve the tasks
    with pytest.raises(ResourcePlanError, match="at most 1 fit"):
        plan_share("auto", 2, [Node(2, gpus=2)])
    assert plan_share("auto", 2, [Node(2, gpus=2), Node(4)]).size == 2  # the CPU node runs the tasks
    with pytest.raises(ResourcePlanError, match="no live node has a GPU"):
        plan_share("cuda", None, [Node(16)])


def test_memory_the_tasks_reserve_is_counted():
    with pytest.raises(ResourcePlanError, match="GiB of memory"):
        plan_share("cpu", 1, [Node(4, memory=2**30)], task_memory=2 * 2**30)
    # only the big node runs tasks: the actors may fill the small one, never the big one's last CPU
    nodes = [Node(4, memory=2**30), Node(2, memory=8 * 2**30)]
    share = plan_share("cpu", 3, nodes, task_memory=2 * 2**30)
    assert worst_case_free(nodes, 3, share.num_cpus, runs_tasks=[False, True])
    assert not worst_case_free(nodes, 3, 0.5, runs_tasks=[False, True])  # the share a memory-blind plan gave


def test_protect_refuses_a_pool_that_cannot_fit_in_one_line(ray_local, tiny_models, tmp_path, capsys):
    # (tiny_models: the built-in exists, so a fresh cache's "generating built-in model" line is not this run's)
    import ray

    from pipeline.cli import main
    from pipeline.io.sample_data import photo_samples

    cpus = ray.cluster_resources()["CPU"]
    src = tmp_path / "in"
    src.mkdir()
    for s in photo_samples(2):
        (src / f"{s['__key__']}.png").write_bytes(s["png"])
    too_many = int((cpus - TASK_CPUS) / MIN_SHARE) + 1  # one node: the actors may share all but one CPU
    code = main(["protect", str(src), str(tmp_path / "out"), "--model", "tiny", "--steps", "1", "--no-progress",
                 "--actors", str(too_many)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert f"--actors {too_many} cannot run" in err and f"the largest --actors that fits is {too_many - 1}" in err
    assert not (tmp_path / "out" / "img00000.png").exists()
    # the largest that fits runs, with its lowered share said once
    code = main(["protect", str(src), str(tmp_path / "out"), "--model", "tiny", "--steps", "1", "--no-progress",
                 "--actors", str(too_many - 1)])
    err = capsys.readouterr().err
    assert code == 0 and (tmp_path / "out" / "img00000.png").exists()
    assert err.count("CPU stays free for the pipeline's tasks") == 1


# ---------------------------------------------------------------- the stall watchdog


def test_a_stalled_study_or_evaluation_ends_with_exit_4_and_one_line(capsys):
    """evaluate and study end through `run_with_exit_codes`: --stall-timeout's `Stalled` is exit 4, not a traceback."""
    from argparse import Namespace

    from pipeline.cluster.watchdog import STALL_EXIT, Stalled
    from pipeline.commands.options import run_with_exit_codes

    def stalls(settings, log):
        raise Stalled("no sample finished for 30 s (--stall-timeout 30); Ray: CPU 0/2 free")

    assert run_with_exit_codes(lambda args: "settings", stalls, Namespace()) == STALL_EXIT
    err = capsys.readouterr().err
    assert err.startswith("mimicshield: error: the run stalled: no sample finished for 30 s") and "Traceback" not in err
    assert "rerun the same command to resume" in err


def test_watchdog_reports_at_the_runs_own_pace_and_ends_at_the_timeout():
    from pipeline.cluster.watchdog import Watchdog, report_after

    now = [0.0]
    lines, interrupts = [], []
    dog = Watchdog(timeout=None, log=lines.append, pending=lambda: "CPU 0/2 free", clock=lambda: now[0],
                   interrupt=lambda: interrupts.append(now[0]), minimum=5.0, nodes=dict)
    for _ in range(10):  # a sample every 2 s
        now[0] += 2.0
        dog.tick()
    assert report_after(dog.gaps, 5.0) == 20.0
    now[0] += 19.0
    dog.check()
    assert lines == []
    now[0] += 2.0
    dog.check()
    dog.check()  # once per stall
    assert lines == ["mimicshield: no sample finished for 21 s; Ray: CPU 0/2 free"] and not interrupts
    dog.tick()  # progress again: a new stall would be reported again
    assert dog.reported is False
    timed = Watchdog(timeout=30.0, log=lines.append, pending=lambda: "GPU 0/1 free", clock=lambda: now[0],
                     interrupt=lambda: interrupts.append(now[0]), minimum=5.0, nodes=dict)
    now[0] += 29.0
    timed.check()
    assert not interrupts and timed.fired is None
    now[0] += 1.0
    timed.check()
    assert interrupts and "no sample finished for 30 s (--stall-timeout 30); Ray: GPU 0/1 free" == timed.fired
    timed.check()  # until the run ends, every look interrupts again (one can be swallowed by a finalizer)
    assert len(interrupts) == 2 and "30 s" in timed.fired


def test_protect_with_a_stall_timeout_ends_in_one_line_and_resumes(tmp_path):
    """No sample can finish within the timeout (a million PGD steps): exit 4, one line, nothing half-written.

    Run as a user runs it, in a process of its own (with a limit, so that a watchdog that fails to end the
    run fails this test instead of hanging the suite: it once did, in a long-lived test process)."""
    import os
    import subprocess
    import sys
    import time

    from pipeline.cluster.watchdog import STALL_EXIT
    from pipeline.io.sample_data import photo_samples

    src = tmp_path / "in"
    src.mkdir()
    for s in photo_samples(1):
        (src / f"{s['__key__']}.png").write_bytes(s["png"])
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="ms-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)

    def protect(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "protect", str(src), str(tmp_path / "out"),
                               "--model", "tiny", "--no-progress", "--device", "cpu", *args],
                              capture_output=True, text=True, env=env, timeout=150)

    start = time.perf_counter()
    try:
        done = protect("--steps", "1000000", "--stall-timeout", "5")
        seconds = time.perf_counter() - start
        assert done.returncode == STALL_EXIT, done.stderr
        lines = [line for line in done.stderr.splitlines() if "stalled" in line]
        assert len(lines) == 1 and "no sample finished for" in lines[0] and "--stall-timeout 5" in lines[0]
        assert seconds < 90, seconds
        assert not (tmp_path / "out" / "img00000.png").exists()
        again = protect("--steps", "1")  # the rerun (other settings: none committed)
        assert again.returncode == 0 and (tmp_path / "out" / "img00000.png").exists(), again.stderr
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_watchdog_names_a_lost_node_once():
    from pipeline.cluster.watchdog import Watchdog

    now, lines = [0.0], []
    alive = {"a" * 16: "10.0.0.1", "b" * 16: "10.0.0.2"}
    dog = Watchdog(log=lines.append, clock=lambda: now[0], interrupt=lambda: None, nodes=lambda: dict(alive),
                   nodes_every_s=10.0, pending=lambda: "")
    dog.check()
    del alive["b" * 16]
    now[0] += 5.0
    dog.check()
    assert lines == []  # looked 5 s ago: not yet
    now[0] += 5.0
    dog.check()
    now[0] += 10.0
    dog.check()
    assert lines == ["mimicshield: lost Ray node 10.0.0.2 (bbbbbbbb); Ray retries its tasks and restarts its actors "
                     "elsewhere, the run goes on"]


def test_a_lost_node_that_leaves_the_pool_no_room_ends_the_run_at_once():
    """Head 1 CPU + worker 1 CPU, one CPU actor (0.5 CPU) beside a task slot: the plan fits the two nodes, not the
    head alone; Ray would wait for the lost node forever, so the watchdog ends the run (exit 4, a rerun resumes)."""
    from pipeline.cluster.pool import Node, no_longer_fits, plan_share
    from pipeline.cluster.watchdog import Watchdog

    share = plan_share("cpu", None, [Node(1), Node(1)])
    assert (share.size, share.num_cpus) == (1, 0.5)
    assert no_longer_fits(share, [Node(1), Node(1)]) is None
    reason = no_longer_fits(share, [Node(1)])
    assert reason is not None and "no longer fit on 1 node(s) with 1 CPU(s)" in reason
    gpu = plan_share("cuda", None, [Node(8, 2), Node(8, 2)])
    assert no_longer_fits(gpu, [Node(8, 2), Node(8, 2)]) is None and "need 4 GPU(s)" in no_longer_fits(gpu, [Node(8, 2)])

    now, lines, interrupts = [0.0], [], []
    alive = {"a" * 16: "10.0.0.1", "b" * 16: "10.0.0.2"}
    dog = Watchdog(log=lines.append, clock=lambda: now[0], interrupt=lambda: interrupts.append(now[0]),
                   nodes=lambda: dict(alive), pending=lambda: "",
                   replan=lambda: no_longer_fits(share, [Node(1)] * len(alive)))
    dog.check()
    del alive["b" * 16]
    now[0] += 10.0
    dog.check()
    assert interrupts == [10.0] and dog.fired == f"lost Ray node(s) 10.0.0.2: {reason}"
    assert lines == [f"mimicshield: lost Ray node 10.0.0.2 (bbbbbbbb); Ray retries its tasks and restarts its actors "
                     f"elsewhere, but {reason}"]


def test_by_default_a_stall_ends_the_run_after_30x_its_pace_and_at_least_an_hour():
    from pipeline.cluster.watchdog import AUTO_TIMEOUT_S, Watchdog, auto_timeout

    assert auto_timeout([]) == AUTO_TIMEOUT_S == 3600 and auto_timeout([200.0] * 5) == 6000
    now, interrupts = [0.0], []
    dog = Watchdog(log=lambda line: None, clock=lambda: now[0], interrupt=lambda: interrupts.append(now[0]),
                   pending=lambda: "CPU 0/2 free", nodes=dict)
    now[0] = AUTO_TIMEOUT_S - 1
    dog.check()
    assert not interrupts
    now[0] = AUTO_TIMEOUT_S
    dog.check()
    assert interrupts and dog.fired.startswith("no sample finished for 3600 s (the default --stall-timeout: 3600 s")


def test_the_stall_interrupt_wakes_a_main_thread_blocked_in_a_wait_even_with_sigint_ignored():
    """A driver blocked in a wait must still be interrupted, also where SIGINT is ignored (a job started in the
    background by a non-interactive shell: `cmd &`, cron): `_thread.interrupt_main` waits for the lock's own
    timeout there (10 s here; forever without one) or does nothing. Inside a Watchdog the interrupt is the
    watchdog's own signal and lands at once."""
    import signal
    import threading
    import time

    from pipeline.cluster.watchdog import Watchdog, interrupt_main_thread

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        held = threading.Lock()
        held.acquire()
        with Watchdog(timeout=None, log=lambda line: None, nodes=dict, poll_s=60):
            timer = threading.Timer(0.3, interrupt_main_thread)
            start = time.monotonic()
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                held.acquire(timeout=10)
            assert time.monotonic() - start < 3
    finally:
        signal.signal(signal.SIGINT, old)
