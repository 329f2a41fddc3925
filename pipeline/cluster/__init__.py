"""The Ray cluster the jobs run on (protect, evaluate and study alike).

- `session`  joining or starting Ray (`ensure_ray`), errors unwrapped for people (`short_error`)
- `logs`     what Ray prints on the terminal: quiet by default, everything with `--verbose`
- `pool`     actor-pool sizing: how many actors, and the resources each one takes
- `watchdog` a run that stops making progress says so (and ends, with --stall-timeout)
- `faults`   `fault_point`: the one hook tests use to inject crashes
"""
