"""The training curve of a built-in's training script: each point printed as a JSON line and appended to
DIR/curve.jsonl (the figures in benchmarks/results/*_curve.jsonl were written this way)."""

from __future__ import annotations

import json
from pathlib import Path


class CurveLog:
    """`log(point)`: print `point` as one JSON line and append it to ``out/curve.jsonl``.

    `fresh` removes a curve left by an earlier run first; a later phase of the same run appends to it.
    """

    def __init__(self, out: Path, fresh: bool = True):
        self.path = Path(out) / "curve.jsonl"
        if fresh:
            self.path.unlink(missing_ok=True)

    def __call__(self, point: dict) -> None:
        line = json.dumps(point)
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")
