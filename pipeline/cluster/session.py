"""Joining or starting Ray, once per process, and Ray's errors as one line a person can read."""

from __future__ import annotations

import os
import re

from pipeline.cluster.logs import init_ray


def ensure_ray(address: str | None = None, verbose: bool = False):
    """The `ray` module, connected: to `address`, else RAY_ADDRESS, else a local Ray started in-process."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        init_ray(address, verbose, include_dashboard=False)
    return ray


def short_error(err: BaseException) -> str:
    """The innermost 'SomethingError: reason' of an exception (Ray wraps task errors in layers)."""
    texts, seen, e = [], set(), err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(f"{type(e).__name__}: {e}")
        e = getattr(e, "cause", None) or e.__cause__
    found = [m.group(0).strip() for t in texts for m in re.finditer(r"^\s*[\w.]*(?:Error|Exception): .+$", t, re.M)]
    found = [f for f in found if not f.startswith(("ray.", "RayTaskError", "SystemException"))]
    return (found[-1] if found else texts[0].splitlines()[0])[:500]
