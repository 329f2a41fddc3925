"""Joining or starting Ray, once per process, and Ray's errors as one line a person can read.

Token authentication (Ray >= 2.5x turns it on for ``ray start --head``): a driver joining a cluster with
``--address`` (or RAY_ADDRESS) finds the cluster's token where Ray's own CLI looks, in this order:
``RAY_AUTH_TOKEN`` (the token itself), ``RAY_AUTH_TOKEN_PATH`` (a file holding it), ``~/.ray/auth_token``.
When one is there and ``RAY_AUTH_MODE`` is unset, the driver sends it (``RAY_AUTH_MODE=token``), as
``ray start`` does; ``RAY_AUTH_MODE=disabled`` opts out. A cluster that refuses the driver (no token, a
wrong one) is `ClusterAuthError`: one line saying what to set (docs/cluster.md, "Token authentication").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.cluster.logs import init_ray

AUTH_DOC = "docs/cluster.md#token-authentication"


class ClusterAuthError(ValueError):
    """The Ray cluster at --address refused this driver's token (missing or wrong). str() says what to set."""


def token_source() -> str | None:
    """Where this process would take a Ray auth token from (None: nowhere)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH={path}" if Path(path).is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def use_token_if_available() -> None:
    """Joining a cluster: send the token Ray's CLI would find (RAY_AUTH_MODE unset -> token when one exists).

    Ray reads the mode into its C++ config when it is imported; like ``ray start``, the config is
    re-read after the variable is set (``Config.initialize``).
    """
    if "RAY_AUTH_MODE" in os.environ or not token_source():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):  # another Ray: it reads the environment itself
        pass


def auth_refused(err: BaseException) -> bool:
    """Is `err` (or what caused it) Ray refusing this driver's token?"""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def auth_advice(address: str) -> str:
    source = token_source()
    had = (f"the token from {source} was refused" if source and os.environ.get("RAY_AUTH_MODE") == "token"
           else "this driver sent no token")
    return (f"the Ray cluster at {address} uses token authentication and {had}: set RAY_AUTH_MODE=token and "
            f"RAY_AUTH_TOKEN_PATH=<a file holding the cluster's token> (or RAY_AUTH_TOKEN=<the token>); "
            f"on the head node `ray get-auth-token` prints it ({AUTH_DOC})")


def ensure_ray(address: str | None = None, verbose: bool = False):
    """The `ray` module, connected: to `address`, else RAY_ADDRESS, else a local Ray started in-process."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            use_token_if_available()
        try:
            init_ray(address, verbose, replay_if=lambda err: not auth_refused(err), include_dashboard=False)
        except Exception as err:
            if address and auth_refused(err):
                raise ClusterAuthError(auth_advice(address)) from None
            raise
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
