"""What every benchmark's results share: the machine line of its markdown and writing results/<name>.json + .md.

A figure is only as good as the machine state it was taken in, so each markdown says the CPU count, the
torch threads and the load average when the benchmark ended (other work on a 2-core machine skews timings).
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_lines(threads) -> list[str]:
    """Markdown bullets: machine, CPUs, torch threads, load average now, and the UTC time."""
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return [f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {threads or 'default'}, "
            f"load average {load} at the end",
            f"- {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"]


def write_results(name: str, payload: dict, markdown: str) -> None:
    """results/<name>.json (the payload) and results/<name>.md (the markdown, also printed)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
