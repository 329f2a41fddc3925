"""Ray job entry point: protect an archive with the settings of a YAML/JSON config file.

Submit it to a running cluster (the job's driver runs on the head node and connects to it):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/protect.py --config jobs/configs/example.yaml

Any `mimicshield protect` option may follow the config and overrides it, e.g.
``--steps 50`` or ``--actors 8``. INPUT and OUTPUT come from the config (``input:``, ``output:``)
or as the first two arguments. Exit status: 0 when the run completed (bad samples are error
rows, not failures), 2 for a run that cannot start (bad config, credentials, bucket, model).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML or JSON config (see jobs/configs/example.yaml)")
    known, rest = parser.parse_known_args(argv)
    from pipeline.cli import main as cli_main

    return cli_main(["protect", "--config", known.config, *rest])


if __name__ == "__main__":
    sys.exit(main())
