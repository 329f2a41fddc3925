"""`mimicshield protect INPUT OUTPUT`: protect every image under INPUT, write them under OUTPUT."""

from __future__ import annotations

import argparse
import sys

from pipeline.commands.help import HelpFormatter
from pipeline.commands.options import (
    add_protection_options,
    add_run_options,
    lead_with,
    run_settings_from_args,
    stalled_message,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "protect",
        help="protect a folder of images, local WebDataset shards or s3:// shards (through Ray)",
        description="Protect every image under INPUT and write it under OUTPUT through Ray Data "
        "(local Ray started in-process, or a cluster with --address / RAY_ADDRESS). INPUT is a folder of "
        "images, a folder or brace pattern of WebDataset shards (shard-{000000..000099}.tar), or the same "
        "under s3://bucket/prefix/. Shards keep their names, keys, formats and JSON metadata (protection "
        "parameters added under 'mimicshield'); OUTPUT/tables/ gets Parquet tables protect_metrics, errors "
        "and runs. Rerunning the same command resumes: finished shards are skipped (other settings into the same "
        "OUTPUT are refused unless --overwrite). Exit codes: 0 done, 1 failed midway, 2 bad options or input, "
        "3 some input shards could not be read, 4 stalled (--stall-timeout), 5 the output storage failed (disk full, "
        "permission, S3 access): free it and rerun to resume.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("input", nargs="?", help="input folder, shard folder/pattern, or s3://bucket/prefix")
    p.add_argument("output", nargs="?", help="output folder or s3://bucket/prefix")
    p.add_argument("--config", default=None, help="YAML or JSON file with any of these options (input, output, "
                   "method, eps, model, s3: {endpoint_url, region}, ...); command-line options win")
    add_protection_options(p)
    p.add_argument("--group-by", default=None, help="aspl: what makes a group protected together: a JSON field, or "
                   "'folder' (a folder INPUT's sub-folders: art/<artist>/...); default the JSON group, else artist "
                   "field; a sample with none is protected alone. One actor task per group")
    add_run_options(p)
    lead_with(p, "Protect every image under INPUT (folder, shards, s3://) and write it under OUTPUT.",
              ("--model", "--method", "--eps", "--device"),
              "mimicshield protect photos/ out/protected --model tiny --steps 20 --device cpu")
    p.set_defaults(func=run, _parser=p)


def parse_settings(argv: list[str]):
    """`RunSettings` for ``mimicshield protect ARGV`` (what `run` would use), without running anything."""
    parser = argparse.ArgumentParser(prog="mimicshield")  # this command alone (pipeline.cli holds them all)
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["protect", *argv])
    args._argv = list(argv)
    return run_settings_from_args(args)


def run(args: argparse.Namespace) -> int:
    from pipeline.batch.driver import BAD_SHARDS_EXIT, BadShard, run_protect
    from pipeline.cluster.watchdog import STALL_EXIT, Stalled
    from pipeline.io.paths import STORAGE_EXIT, StorageError
    from pipeline.io.storage import InputError
    from pipeline.models.loading import ModelLoadError

    try:
        settings = run_settings_from_args(args)
        summary = run_protect(settings, log=lambda msg: print(msg, file=sys.stderr))
    except StorageError as err:  # disk full, permission, bucket gone: committed units kept
        print(f"mimicshield: error: {err}", file=sys.stderr)
        return STORAGE_EXIT
    except BadShard as err:  # --on-bad-shard fail
        print(f"mimicshield: error: {err}", file=sys.stderr)
        return BAD_SHARDS_EXIT
    except (ModelLoadError, InputError, ValueError, FileNotFoundError) as err:
        print(f"mimicshield: error: {err}", file=sys.stderr)
        return 2
    except Stalled as err:  # --stall-timeout: one line, committed units kept
        print(stalled_message(err), file=sys.stderr)
        return STALL_EXIT
    except Exception as err:  # mid-run failure (e.g. an unreadable tar): say so once, keep what is committed
        from pipeline.cluster.session import short_error

        print(f"mimicshield: error: the run failed: {short_error(err)}\n"
              "Shards finished before the failure are kept (see OUTPUT/tables/runs/); fix or remove the bad "
              "input and rerun the same command to resume.", file=sys.stderr)
        return 1
    print(summary)
    return BAD_SHARDS_EXIT if summary.shards_failed else 0
