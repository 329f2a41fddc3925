"""Actor-pool sizing and the resource plan: one rule for every pool, checked before any work starts.

Every job runs a pool of model actors (protect's protection actors, evaluate's mimics, the study's cells)
beside CPU tasks (read, decode, encode, write, purify). Ray schedules both from the same node
resources, so a pool that takes every CPU leaves the tasks waiting forever: a silent hang. The rule:

    GPU (``--device cuda``, or ``auto`` on a cluster with GPUs):
        one actor per GPU (or ``--actors``), each holding 1 GPU and 1 CPU
    CPU:
        ``--actors`` actors (default: the caller's), sharing the CPUs but leaving one whole CPU free:
            num_cpus per actor = max(0.5, min(smallest node - 1, (cluster CPUs - 1) / actors))
        torch threads per actor: its whole CPUs, or (``spread_threads``, for pools whose work happens
        while few tasks run, like the study's cells) the cluster's CPUs divided among the actors.

and the check (`plan_share`, on the live nodes): however Ray places the actors, some node must keep a
whole CPU (and the memory a task reserves) for the tasks. Ray places actors where they fit, so the
worst case is every node filled until less than one CPU is left; a node is "blocked" by
``floor((cpus - 1) / share) + 1`` actors. When the pool holds fewer actors than it takes to block every
node that could run a task, the plan cannot deadlock. Otherwise the share is lowered (down to
`MIN_SHARE`) until it cannot; and when no share fits, `ResourcePlanError` says so in one line, with the
largest ``--actors`` that fits. Nothing waits silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_SHARE = 0.25  # the least CPU an actor is given (a quarter core still runs, slowly)
TASK_CPUS = 1.0  # what one CPU task (decode, encode, write, purify) reserves


class ResourcePlanError(ValueError):
    """The requested pool cannot run beside the pipeline's tasks on this cluster. str() says what fits."""


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float = 0.0
    memory: float = math.inf  # bytes Ray may give tasks on this node


def uses_gpu(device: str, gpus: float) -> bool:
    """Do actors of a model on `device` run on GPUs, on a cluster with `gpus` GPUs?"""
    return device.startswith("cuda") or (device == "auto" and gpus > 0)


@dataclass(frozen=True)
class ActorShare:
    size: int  # actors in the pool
    gpu: bool  # one GPU each
    num_cpus: float  # Ray's CPU reservation per actor
    threads: int | None  # torch threads per actor (None: leave torch's default, on GPU)
    note: str | None = None  # set when the share was lowered to fit beside the tasks (one line for the user)

    def describe(self) -> str:
        return f"{self.size} {'GPU' if self.gpu else 'CPU'} actor(s)"

    def actor_options(self) -> dict:
        """Options for `ray.remote(cls).options(...)`."""
        return {"num_gpus": 1, "num_cpus": self.num_cpus} if self.gpu else {"num_cpus": self.num_cpus}

    def pool_options(self) -> dict:
        """Options for `Dataset.map_batches` / `map_groups` with an actor pool."""
        import ray

        compute = (ray.data.ActorPoolStrategy(min_size=1, max_size=self.size) if self.gpu
                   else ray.data.ActorPoolStrategy(size=self.size))
        return {"compute": compute, **self.actor_options()}


def _blocking_actors(nodes: list[Node], share: float, task_memory: float) -> float:
    """How many actors of `share` CPUs it takes to leave no node with a free task slot (inf: impossible)."""
    total = 0
    for n in nodes:
        if n.memory < task_memory or n.cpus < TASK_CPUS:
            continue  # never runs a task anyway
        k = math.floor((n.cpus - TASK_CPUS) / share + 1e-9) + 1  # actors that leave it less than a task slot
        if k * share > n.cpus + 1e-9:
            return math.inf  # this node always keeps a task slot
        total += k
    return total


def _placeable(nodes: list[Node], share: float) -> int:
    return sum(math.floor(n.cpus / share + 1e-9) for n in nodes)


def _fits(nodes: list[Node], size: int, share: float, task_memory: float) -> bool:
    return size <= _placeable(nodes, share) and size < _blocking_actors(nodes, share, task_memory)


def _describe(nodes: list[Node]) -> str:
    cpus = ", ".join(f"{n.cpus:g}" for n in nodes)
    return f"{len(nodes)} node(s) with {cpus} CPU(s)"


def plan_share(device: str, actors: int | None, nodes: list[Node], default_cpu_actors: int = 1,
               spread_threads: bool = False, task_memory: float = 0.0) -> ActorShare:
    """The pool's share of `nodes` (see the module doc); `ResourcePlanError` when it cannot run beside tasks."""
    nodes = [n for n in nodes if n.cpus > 0 or n.gpus > 0]
    if not nodes:
        raise ResourcePlanError("the Ray cluster has no live node with CPUs")
    cpus, gpus = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    if not any(n.memory >= task_memory and n.cpus >= TASK_CPUS for n in nodes):
        raise ResourcePlanError(f"no node has {task_memory / 2**30:.1f} GiB of memory and a CPU for the pipeline's "
                                f"tasks ({_describe(nodes)}); lower --max-pixels or add a larger node")
    if uses_gpu(device, gpus):
        size = actors or max(int(gpus), 1)
        if not any(n.gpus >= 1 and n.cpus >= 1 for n in nodes):
            raise ResourcePlanError(f"the pool needs GPU actors (--device {device}) but no live node has a GPU and a "
                                    f"CPU ({_describe(nodes)}); start GPU workers first (an autoscaling GPU group: "
                                    "min_workers >= 1), or use --device cpu")
        # GPU actors (1 GPU + 1 CPU each) land on GPU nodes only, at most one per GPU: a node loses its last
        # task slot only when its GPUs can hold all its CPUs, so CPU-only nodes never block
        task_nodes = [n for n in nodes if n.cpus >= TASK_CPUS and n.memory >= task_memory]
        if all(n.gpus >= math.floor(n.cpus - TASK_CPUS) + 1 for n in task_nodes):
            blocking = sum(math.floor(n.cpus - TASK_CPUS) + 1 for n in task_nodes)
            if size >= blocking:
                raise ResourcePlanError(f"--actors {size} GPU actors would hold every CPU of {_describe(nodes)}, "
                                        f"leaving none for the pipeline's tasks; at most {blocking - 1} fit")
        return ActorShare(size=size, gpu=True, num_cpus=1.0, threads=None)
    size = actors or max(1, default_cpu_actors)
    smallest = min(n.cpus for n in nodes if n.cpus > 0)
    wanted = max(0.5, min(smallest - TASK_CPUS, (cpus - TASK_CPUS) / size))
    candidates = [wanted] + [s / 20 for s in range(int(wanted * 20) - 1, int(MIN_SHARE * 20) - 1, -1)]
    share = next((s for s in candidates if s >= MIN_SHARE and _fits(nodes, size, s, task_memory)), None)
    if share is None:
        fit = max((n for n in range(size - 1, 0, -1) if _fits(nodes, n, MIN_SHARE, task_memory)), default=0)
        advice = f"the largest --actors that fits is {fit}" if fit else "no CPU actor fits beside the tasks"
        raise ResourcePlanError(f"--actors {size} cannot run beside the pipeline's tasks on {_describe(nodes)}: "
                                f"every node must keep {TASK_CPUS:g} CPU for reading, decoding and writing; {advice}")
    threads = max(1, int(cpus // size)) if spread_threads else max(1, int(share))
    note = None if share == wanted else (f"{size} CPU actors get {share:g} CPU each (not {wanted:g}) so that a CPU stays "
                                         f"free for the pipeline's tasks on {_describe(nodes)}")
    return ActorShare(size=size, gpu=False, num_cpus=share, threads=threads, note=note)


def no_longer_fits(share: ActorShare, nodes: list[Node], task_memory: float = 0.0) -> str | None:
    """Why a running pool cannot go on on `nodes` (the live ones, after a node was lost), or None when it can.

    A pool whose actors cannot all be placed beside a task slot any more would wait for the lost node forever
    (Ray retries without end): the run ends instead (cluster/watchdog.py), and a rerun resumes.
    """
    nodes = [n for n in nodes if n.cpus > 0 or n.gpus > 0]
    if not nodes:
        return "the Ray cluster has no live node with CPUs left"
    if share.gpu:
        gpus = sum(math.floor(n.gpus) for n in nodes if n.cpus >= 1)
        if gpus < share.size:
            return f"the pool's {share.size} GPU actor(s) need {share.size} GPU(s); the live nodes have {gpus}"
        return None
    if not _fits(nodes, share.size, share.num_cpus, task_memory):
        return (f"the pool's {share.size} CPU actor(s) of {share.num_cpus:g} CPU each and a CPU for the pipeline's "
                f"tasks no longer fit on {_describe(nodes)}")
    return None


def live_nodes() -> list[Node]:
    """The connected Ray cluster's live nodes (CPUs, GPUs, memory)."""
    import ray

    return [Node(cpus=float(n["Resources"].get("CPU", 0)), gpus=float(n["Resources"].get("GPU", 0)),
                 memory=float(n["Resources"].get("memory", math.inf)))
            for n in ray.nodes() if n.get("Alive")]


def actor_share(device: str, actors: int | None, default_cpu_actors=1, spread_threads: bool = False,
                task_memory: float = 0.0) -> ActorShare:
    """The share of the connected Ray cluster a pool of model actors gets (see the module doc).

    `default_cpu_actors`: an int, or a function of the cluster's CPU count.
    """
    nodes = live_nodes()
    cpus = sum(n.cpus for n in nodes)
    default = default_cpu_actors(cpus) if callable(default_cpu_actors) else default_cpu_actors
    return plan_share(device, actors, nodes, default, spread_threads, task_memory)
