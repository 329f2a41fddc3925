"""What a sample says about itself: its JSON metadata and its prompt (one definition for every job).

`sample_prompt(meta, txt)` is read once, when a sample is read (`webdataset.sample_row`), and travels
with the sample as its ``prompt`` column: protection, evaluation and the robustness study all use
that column, so a sample is protected and mimicked with the same caption.
"""

from __future__ import annotations

import json

PROMPT_FIELDS = ("prompt", "caption")  # JSON fields that hold a sample's prompt, in order of preference


def sample_meta(meta: str | None) -> dict | None:
    """The JSON metadata as a dict (None when absent or not a JSON object)."""
    if not meta:
        return None
    try:
        value = json.loads(meta)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def sample_prompt(meta: str | dict | None, txt: bytes | None = None) -> str | None:
    """The sample's own prompt: its JSON ``prompt``, else ``caption``, else its ``.txt`` member; else None."""
    fields = meta if isinstance(meta, dict) else sample_meta(meta) or {}
    for name in PROMPT_FIELDS:
        value = fields.get(name)
        if isinstance(value, str) and value.strip():
            return value
    if txt:
        return txt.decode("utf-8", errors="replace").strip() or None
    return None
