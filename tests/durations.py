"""Seconds each test file took (tests/durations.json), so the suite's two workers start with the longest files.

`pytest -n 2 --dist loadfile` hands out whole files in collection order, one to each worker that is free; with the
longest files last, one worker ends minutes before the other (a long file alone at the end). conftest.py orders
the files longest first (longest-processing-time-first scheduling); a file not listed counts as short.

Refresh after a suite's balance changes:
    HF_HUB_OFFLINE=1 python -m pytest -q -n 2 --dist loadfile --junitxml=/tmp/suite.xml
    python tests/durations.py /tmp/suite.xml
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

PATH = Path(__file__).with_name("durations.json")


def load() -> dict[str, float]:
    """{test file name: seconds}; empty when the file is missing."""
    return json.loads(PATH.read_text()) if PATH.exists() else {}


def from_junit(xml_path: str) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for case in ET.parse(xml_path).iter("testcase"):
        name = case.get("classname", "").split(".")[-1] + ".py"
        seconds[name] = seconds.get(name, 0.0) + float(case.get("time") or 0)
    return {name: round(s, 1) for name, s in sorted(seconds.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":
    PATH.write_text(json.dumps(from_junit(sys.argv[1]), indent=1) + "\n")
    print(f"wrote {PATH}")
