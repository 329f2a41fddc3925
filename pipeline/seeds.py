"""Per-key seeds: the one scheme for every random draw tied to an image (or a group of images).

    key_seed(seed, key, stream) = sha256("<stream>:<seed>:<key>")[:8] as little-endian, top bit cleared
                                  (stream "": sha256("<seed>:<key>"), the protection's own draw)

A draw depends only on the run's seed, the sample's key and what the draw is for (`stream`), never
on batch composition, worker or order, so a resumed or re-sharded run draws the same numbers, and a
protected image and its clean original get the same mimic noise and the same purification.
Streams in use:

    ""                 PGD start (protect/engine.py)
    "eot"              EOT transforms (protect/eot.py)
    "mimic"            SDEdit / inpainting noise and masks, per image (evaluate/mimic/)
    "train"            textual-inversion / LoRA training, per group (evaluate/mimic/training.py)
    "purify:<spec>"    a purification's noise, per image (study/purify/); gridpure derives one seed per
                       iteration and grid from it (stream "gridpure", key "<iteration>/<grid>")
    "purify:cat"       CAT's attacker, once per study (key: the spec): its images, batches, adapters' init
    "aspl"             ASPL's surrogate, per group (key: the sorted keys): its batches and LoRA init

Library code that draws from torch's *global* generator (peft's LoRA init) runs inside
`seeded_global_rng(seed)`, so its draw depends on the seed, not on what ran before in the process.

The result fits torch's and numpy's generators (63 bits).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager


def key_seed(seed: int, key: str, stream: str = "") -> int:
    """The seed of one draw for `key` under the run's `seed` (see the module doc for `stream`)."""
    text = f"{stream}:{int(seed)}:{key}" if stream else f"{int(seed)}:{key}"
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@contextmanager
def seeded_global_rng(seed: int):
    """Torch's global generator (and the current CUDA device's) seeded with `seed` for the block, restored after."""
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
