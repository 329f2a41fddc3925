"""Inpainting masks: from a sample's metadata, a centre box, or seeded random boxes.

A mask is a uint8 H x W array, 255 where the inpainting model repaints and 0 where it keeps
the (protected or clean) pixels, the convention of diffusers' inpainting pipelines.

Metadata masks are read from the sample's JSON: ``"mask": [x0, y0, x1, y1]`` (pixels, or
fractions of the width/height when every number is <= 1), a list of such boxes, or
``"mask": {"box": [...]}`` / ``{"boxes": [[...], ...]}``.
"""

from __future__ import annotations

import numpy as np

MASK_MODES = ("meta", "center", "random")


def _box_to_pixels(box, height: int, width: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (float(v) for v in box)
    if max(abs(x0), abs(y0), abs(x1), abs(y1)) <= 1.0:  # fractions of the image size
        x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    x0, x1 = sorted((int(round(np.clip(x0, 0, width))), int(round(np.clip(x1, 0, width)))))
    y0, y1 = sorted((int(round(np.clip(y0, 0, height))), int(round(np.clip(y1, 0, height)))))
    return x0, y0, x1, y1


def boxes_mask(boxes, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    for box in boxes:
        x0, y0, x1, y1 = _box_to_pixels(box, height, width)
        mask[y0:y1, x0:x1] = 255
    return mask


def mask_from_meta(meta: dict | None, height: int, width: int) -> np.ndarray | None:
    """The mask a sample's metadata describes, or None when it has none (or an unreadable one)."""
    if not meta or "mask" not in meta:
        return None
    spec = meta["mask"]
    if isinstance(spec, dict):
        spec = spec.get("boxes") or ([spec["box"]] if "box" in spec else None)
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    boxes = [spec] if all(isinstance(v, (int, float)) for v in spec) else spec
    try:
        mask = boxes_mask(boxes, height, width)
    except (TypeError, ValueError):
        return None
    return mask if mask.any() else None


def center_mask(height: int, width: int, fraction: float = 0.5) -> np.ndarray:
    """A centred box whose sides are `fraction` of the image's sides."""
    bh, bw = max(1, round(height * fraction)), max(1, round(width * fraction))
    top, left = (height - bh) // 2, (width - bw) // 2
    return boxes_mask([(left, top, left + bw, top + bh)], height, width)


def random_mask(height: int, width: int, seed: int, boxes: int = 3, max_fraction: float = 0.4) -> np.ndarray:
    """`boxes` random boxes, each side at most `max_fraction` of the image's; the same for one seed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(boxes):
        bh = int(rng.integers(max(1, height // 8), max(2, int(height * max_fraction)) + 1))
        bw = int(rng.integers(max(1, width // 8), max(2, int(width * max_fraction)) + 1))
        top, left = int(rng.integers(0, height - bh + 1)), int(rng.integers(0, width - bw + 1))
        out.append((left, top, left + bw, top + bh))
    return boxes_mask(out, height, width)


def make_mask(mode: str, height: int, width: int, meta: dict | None = None, seed: int = 0,
              center_fraction: float = 0.5, random_boxes: int = 3) -> np.ndarray | None:
    """The mask of `mode` for one image; None for mode "meta" when the metadata has no mask."""
    if mode == "meta":
        return mask_from_meta(meta, height, width)
    if mode == "center":
        return center_mask(height, width, center_fraction)
    if mode == "random":
        return random_mask(height, width, seed, boxes=random_boxes)
    raise ValueError(f"unknown mask mode {mode!r}; choose from {', '.join(MASK_MODES)}")
