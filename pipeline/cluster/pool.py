"""Actor-pool sizing: one rule for every pool (protect's protection actors, evaluate's mimics, the study's cells).

    GPU (``--device cuda``, or ``auto`` on a cluster with GPUs):
        one actor per GPU (or ``--actors``), each holding 1 GPU and 1 CPU
    CPU:
        ``--actors`` actors (default: the caller's), sharing the CPUs but always leaving one whole CPU free
        on the smallest node, for the read / decode / encode / write tasks that run beside the actors:
            num_cpus per actor = max(0.5, min(smallest node - 1, (cluster CPUs - 1) / actors))
        torch threads per actor: its whole CPUs, or (``spread_threads``, for pools whose work happens
        while few tasks run, like the study's cells) the cluster's CPUs divided among the actors.
"""

from __future__ import annotations

from dataclasses import dataclass


def uses_gpu(device: str, gpus: int) -> bool:
    """Do actors of a model on `device` run on GPUs, on a cluster with `gpus` GPUs?"""
    return device.startswith("cuda") or (device == "auto" and gpus > 0)


@dataclass(frozen=True)
class ActorShare:
    size: int  # actors in the pool
    gpu: bool  # one GPU each
    num_cpus: float  # Ray's CPU reservation per actor
    threads: int | None  # torch threads per actor (None: leave torch's default, on GPU)

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


def plan_share(device: str, actors: int | None, gpus: int, cpus: float, smallest_node_cpus: float,
               default_cpu_actors: int = 1, spread_threads: bool = False) -> ActorShare:
    """The rule of the module doc, on given resources (pure: tested without Ray)."""
    if uses_gpu(device, gpus):
        return ActorShare(size=actors or max(gpus, 1), gpu=True, num_cpus=1.0, threads=None)
    size = actors or max(1, default_cpu_actors)
    per_actor = max(0.5, min(smallest_node_cpus - 1, (cpus - 1) / size))
    threads = max(1, int(cpus // size)) if spread_threads else max(1, int(per_actor))
    return ActorShare(size=size, gpu=False, num_cpus=per_actor, threads=threads)


def actor_share(device: str, actors: int | None, default_cpu_actors=1, spread_threads: bool = False) -> ActorShare:
    """The share of the connected Ray cluster's resources a pool of model actors gets (see the module doc).

    `default_cpu_actors`: an int, or a function of the cluster's CPU count.
    """
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    smallest = min((c for c in node_cpus if c > 0), default=cpus)
    default = default_cpu_actors(cpus) if callable(default_cpu_actors) else default_cpu_actors
    return plan_share(device, actors, gpus, cpus, smallest, default, spread_threads)
