"""Is a hub model reachable? One short request, no retries, and the alternatives when it is not.

`hf_hub_download` retries a failed HEAD with exponential backoff (1, 2, 4, 8, 8 s: about 25 s and six
log lines before it gives up offline). The preflight only needs to know whether ``model_index.json``
can be had, so it asks once:

1. a copy in the local hub cache (``HF_HOME``) is enough (an offline machine with a downloaded model);
2. with ``HF_HUB_OFFLINE=1`` and no cached copy, it fails at once, without a request;
3. otherwise one HEAD request (`get_hf_file_metadata`, no retry), bounded by ``HF_HUB_ETAG_TIMEOUT``
   seconds (huggingface_hub's own setting for this request; default `DEFAULT_TIMEOUT_S` here).
"""

from __future__ import annotations

import os

DEFAULT_TIMEOUT_S = 10.0
INDEX_FILE = "model_index.json"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def timeout_s() -> float:
    """Seconds the one request may take: ``HF_HUB_ETAG_TIMEOUT`` (read now, not at import) or the default."""
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def alternatives(builtins) -> str:
    offline = "" if _offline() else ", or HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache"
    return ("Alternatives: a local diffusers directory (--model /path/to/model; `hf download <id> --local-dir DIR` "
            f"on a machine with network), a built-in model to try the machinery (--model {', '.join(builtins)})"
            + offline)


def hub_problem(repo_id: str, revision: str | None = None) -> str | None:
    """Why `repo_id` cannot be had from the hub right now (None: cached, or the hub answered)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, INDEX_FILE, revision=revision)
    if isinstance(cached, str):
        return None
    if _offline():
        return f"HF_HUB_OFFLINE is set and {repo_id!r} is not in the local Hugging Face cache"
    url = hf_hub_url(repo_id, INDEX_FILE, revision=revision, endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        get_hf_file_metadata(url, timeout=timeout_s())
    except Exception as err:
        name = type(err).__name__
        if "GatedRepo" in name:  # (a subclass of RepositoryNotFoundError)
            return f"{repo_id!r} is gated: accept its licence on the hub and log in (`hf auth login` or HF_TOKEN)"
        if "RepositoryNotFound" in name or "RevisionNotFound" in name or "EntryNotFound" in name:
            return f"{repo_id!r}{f' at revision {revision!r}' if revision else ''} was not found on the hub ({name})"
        first = str(err).splitlines()[0] if str(err) else ""
        return f"cannot reach the Hugging Face hub for {repo_id!r} within {timeout_s():g} s ({name}: {first[:200]})"
    return None
