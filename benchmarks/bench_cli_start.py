"""How fast the command line answers what needs no work: --version, each command's --help, an argument error.

    python benchmarks/bench_cli_start.py          (run alone: figures taken under load are not figures)

Each invocation is a fresh `python -m pipeline.cli` process (best of 5): wall time and peak memory (max RSS).
Target (issue 37): under 1 s and under 150 MB each.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = [["--version"], ["--help"], ["protect", "--help"], ["evaluate", "--help"], ["study", "--help"],
         ["train-fastprotect", "--help"], ["demo", "--help"], ["protect", "in", "out", "--steps", "many"]]


def measure(argv: list[str], repeats: int = 5) -> tuple[float, float]:
    best, peak = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], capture_output=True, cwd=REPO)
        best = min(best, time.perf_counter() - start)
        peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    return best, peak


if __name__ == "__main__":
    print("| invocation | seconds (best of 5) | peak MiB (max so far) |\n|---|---|---|")
    for argv in CASES:
        seconds, mib = measure(argv)
        print(f"| `mimicshield {' '.join(argv)}` | {seconds:.2f} | {mib:.0f} |")
