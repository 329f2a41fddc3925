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


FOLDER_GROUP = "folder"  # --group-by folder: a sample's group is the top folder of its key (art/<artist>/x.png)


def sample_group(key: str, meta: dict | None, group_by: str) -> str | None:
    """The sample's group (an artist, for the training mimics): its JSON field `group_by`, or with
    ``group_by="folder"`` the first part of its key (a folder INPUT's sub-folder); None when it has none."""
    if group_by == FOLDER_GROUP:
        return key.split("/", 1)[0] if "/" in key else None
    value = (meta or {}).get(group_by)
    return None if value in (None, "") else str(value)


GROUP_FIELDS = ("group", "artist")  # JSON fields that name a sample's group when no --group-by is given


def protection_group(key: str, meta: dict | None, group_by: str | None = None) -> str:
    """The group a group method (aspl) protects a sample with: `sample_group` by `group_by`, or without one
    its JSON ``group``, else ``artist``; a sample with none is a group of its own (named by its key)."""
    for field in (group_by,) if group_by else GROUP_FIELDS:
        group = sample_group(key, meta, field)
        if group is not None:
            return f"group:{group}"
    return f"key:{key}"
