"""The protect run's progress bar: one tick per image, as the driver learns of it.

The driver receives one small row per sample (written or error) from the last stage; each row is one
tick. The total is known up front for a folder (one file, one image) and unknown for shards (a shard's
sample count is only known once it is read): the bar then counts up without a total. Shards (or chunks)
committed and errors so far ride along in the postfix. `tqdm` draws it, on stderr, so that stdout keeps
only the summary.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


class ImageProgress:
    """`sample(error)` per image received, `unit_done()` per committed unit, `close()` at the end."""

    def __init__(self, total_images: int | None, units: int, unit_name: str, enabled: bool = True, file=None):
        self.units, self.unit_name = units, unit_name
        self.units_done = self.errors = self.images = 0
        self.bar = tqdm(total=total_images, unit="img", desc="protecting", disable=not enabled,
                        file=file or sys.stderr, dynamic_ncols=True, mininterval=0.5)
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
