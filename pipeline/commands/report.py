"""`mimicshield report OUTPUT`: build OUTPUT/report.html and print a summary table."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="build OUTPUT/report.html from an evaluation output and print a summary",
        description="Read OUTPUT/tables/mimicry_metrics/ and OUTPUT/samples/ (local or s3://), write one "
        "self-contained HTML page OUTPUT/report.html (thumbnails, plots per method and budget, all rows; "
        "images embedded, no server needed) and print the summary table.",
    )
    p.add_argument("output", help="the --output of `mimicshield evaluate` (folder or s3:// prefix)")
    p.add_argument("--max-samples", type=int, default=12, help="sample grids shown per scenario (default 12)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.evaluate.report import build_report, format_summary
    from pipeline.io.storage import InputError

    try:
        path, summary = build_report(args.output, max_samples=args.max_samples)
    except (InputError, FileNotFoundError, OSError) as err:
        print(f"mimicshield: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"\nreport: {path}")
    return 0
