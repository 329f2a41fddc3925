"""Progress bars: protect's per-image bar, and the one bar `evaluate` (pairs) and `study` (cells) show.

The driver receives one small row per sample (written or error) from the last stage; each row is one
tick. The total is known up front for a folder (one file, one image) and unknown for shards (a shard's
sample count is only known once it is read): the bar then counts up without a total. Shards (or chunks)
committed and errors so far ride along in the postfix. `tqdm` draws it, on stderr, so that stdout keeps
only the summary.

`CountProgress` is the same bar counting other things (pairs evaluated, cells computed); it is drawn
only where a person watches (stderr is a terminal) unless told otherwise, so that logs and pipes get
the plain lines instead.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def in_terminal(file=None) -> bool:
    """Whether `file` (default stderr) is a terminal, where a bar is seen rather than logged."""
    isatty = getattr(file or sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _bar(total: int | None, desc: str, unit: str, enabled: bool, file) -> tqdm:
    """The look every bar shares: on stderr, resizing with the terminal, at most two redraws a second."""
    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, file=file or sys.stderr, dynamic_ncols=True,
                mininterval=0.5)


class ImageProgress:
    """`sample(error)` per image received, `unit_done()` per committed unit, `close()` at the end."""

    def __init__(self, total_images: int | None, units: int, unit_name: str, enabled: bool = True, file=None):
        self.units, self.unit_name = units, unit_name
        self.units_done = self.errors = self.images = 0
        self.bar = _bar(total_images, "protecting", "img", enabled, file)
        self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"{self.units_done}/{self.units} {self.unit_name} committed, {self.errors} errors",
                                 refresh=False)

    def sample(self, error: bool = False) -> None:
        self.images += 1
        self.errors += bool(error)
        self._postfix()
        self.bar.update(1)

    def unit_done(self) -> None:
        self.units_done += 1
        self._postfix()
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class CountProgress:
    """One bar counting `unit`s up to `total`: `add(n, note)` as they finish, `close()` at the end.

    `enabled` None: drawn only when `file` (stderr) is a terminal. `shown` says whether it is drawn,
    so that a caller logs a line per item only where there is no bar.
    """

    def __init__(self, total: int | None, desc: str, unit: str, enabled: bool | None = None, file=None):
        self.shown = in_terminal(file) if enabled is None else enabled
        self.done = 0
        self.bar = _bar(total, desc, unit, self.shown, file)

    def add(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(n)

    def note(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "CountProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
