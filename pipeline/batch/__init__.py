"""The protect job on Ray: INPUT -> protected OUTPUT + tables, resumable, in input order.

- `settings`  `RunSettings`: one typed object per run, validated once; its resume fingerprint
- `driver`    `run_protect(settings)`: preflight, the Ray Data plan, receiving rows, committing units
- `stages`    the Ray Data stages: Decoder -> ProtectActor -> Encoder -> Writer
- `commit`    units of work, output names, and the commit protocol (output, tables, marker)
- `records`   what a run records about itself (sample metadata, metric rows, runs table)
- `progress`  the progress bar
"""
