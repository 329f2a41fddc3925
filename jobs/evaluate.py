"""Ray job entry point: mimicry evaluation of a protected archive, then its report.

Submit it to a running cluster (the driver runs on the head node and connects to it):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py --config jobs/configs/evaluate-example.yaml

The config (YAML or JSON) holds `mimicshield evaluate` options by name: ``protected``,
``clean``, ``output`` and e.g. ``scenario: [sdedit, lora]``, ``group_by: artist``,
``model: /models/sd15``, ``ti_steps: 2000``. Options given after the config override it; with
no config, the arguments are exactly those of `mimicshield evaluate`. After the evaluation the
report is written to OUTPUT/report.html (``--no-report`` skips it).
Exit status: 0 on success, 2 for an evaluation that cannot start (bad URI, model, options).
"""

from __future__ import annotations

import argparse
import json
import sys


def config_args(path: str) -> list[str]:
    """A config file as `mimicshield evaluate` arguments."""
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        config = yaml.safe_load(text) or {}
    else:
        config = json.loads(text)
    args = [str(config.pop("protected"))] if "protected" in config else []
    for key, value in config.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, ",".join(str(v) for v in value)]
        else:
            args += [flag, str(value)]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML or JSON config of evaluate options")
    parser.add_argument("--no-report", action="store_true", help="do not build OUTPUT/report.html")
    known, rest = parser.parse_known_args(argv)
    from pipeline.cli import build_parser

    # the evaluation writes its report itself, through the run's own S3 options (--endpoint-url, ...)
    argv_eval = ["evaluate", *(config_args(known.config) if known.config else []), *rest,
                 *(["--no-report"] if known.no_report else [])]
    args = build_parser().parse_args(argv_eval)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
