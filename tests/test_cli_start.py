"""The command line answers at once: --version, every --help and argument errors import no torch, Ray or diffusers
(those load when work starts), so they take a fraction of a second and little memory. The time itself is measured
in benchmarks/bench_cli_start.py; here what makes it: which modules a fresh process imports, and its peak memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "diffusers", "transformers", "pyarrow", "pandas")
COMMANDS = ["protect", "demo", "evaluate", "report", "train-fastprotect", "study"]


def test_building_every_parser_imports_nothing_heavy():
    code = ("import sys, pipeline.cli as cli; cli.build_parser(); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]", out


# runs the command line in a fresh process and prints that process's own peak memory (KiB) as the last stderr line:
# VmHWM, the peak of this program's memory since exec (getrusage's ru_maxrss would carry the parent's over exec)
RUN_AND_MEASURE = """
import re, runpy, sys
sys.argv = ["mimicshield", *sys.argv[1:]]
try:
    runpy.run_module("pipeline.cli", run_name="__main__")
except SystemExit:
    pass
print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--version"], ["--help"], *([c, "--help"] for c in COMMANDS),
                                  ["protect", "in", "out", "--steps", "many"], ["study", "--eps"], ["nonsense"]])
def test_help_version_and_argument_errors_stay_small(argv):
    done = subprocess.run([sys.executable, "-c", RUN_AND_MEASURE, *argv], capture_output=True, text=True, cwd=REPO)
    *said, peak = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip() or any("error" in line for line in said), done.stderr  # it answered
    assert int(peak) < 150 * 1024, f"{argv}: {int(peak) / 1024:.0f} MiB"
