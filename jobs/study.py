"""Ray job entry point: a robustness study (protect x purify x mimic) on a cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/study.py --config jobs/configs/study-example.yaml

The config (YAML or JSON) holds `mimicshield study` options by name: ``clean``, ``output``,
``methods: [sds-, mist]``, ``eps: [4, 8, 16]``, ``purifications: [none, jpeg:75, ...]``,
``scenarios: [sdedit]``, ``model: /models/sd15``, ... and ``s3: {endpoint_url, region}``.
Options after the config override it. A job submitted again resumes: only missing cells run.
Exit status: 0 on success, 2 for a study that cannot start (bad URI, model, grid).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import main as cli

    return cli(["study", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
