"""The study grid: protections (method x eps) x purifications x scenarios, as data.

    sources   = clean  +  every (method, eps)           protected once each
    purified  = sources x purifications                 one tar of PNGs each
    cells     = purified x scenarios                    one Parquet file each (the commit marker)

A cell is named by a slug of its parts (`sds-_eps8__jpeg-75__sdedit`), so a rerun finds the
cells an earlier run committed and computes only the missing ones. The clean source is the
baseline: method ``none``, eps 0, as in `mimicry_metrics`. A method written ``NAME+eot`` is
protected with expectation over transformation (the study's ``--eot`` spec).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.evaluate.mimic import SCENARIOS
from pipeline.protect import ALL_METHODS
from pipeline.study.purify import parse_purifications

EOT_SUFFIX = "+eot"
DEFAULT_METHODS = ("sds-", "photoguard", "mist", "aspl")  # aspl: Anti-DreamBooth, protects each artist's set
DEFAULT_EPS = (4.0, 8.0, 16.0)
DEFAULT_PURIFICATIONS = ("none", "jpeg:75", "resize:2", "noise:0.05", "blur:1", "quantize:4", "tvm:0.05",
                         "diffpure:0.1", "impress:50", "noisy_upscale:0.1",
                         "gridpure:0.01", "pdmpure:0.1", "cat:100")  # the adaptive attacks of issue 22
DEFAULT_SCENARIOS = ("sdedit", "dreambooth")  # dreambooth: the mimic aspl is made against (issue 22)


def slug(text: str) -> str:
    """A file-name-safe form of a label (letters, digits, '-', '_', '.', '+')."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-") or "x"


@dataclass(frozen=True)
class Source:
    """An image set the mimics see: the clean images, or one protection of them."""

    method: str  # "none" for the clean set; may end in "+eot"
    eps: float

    @property
    def is_clean(self) -> bool:
        return self.method == "none"

    @property
    def base_method(self) -> str:
        return self.method.removesuffix(EOT_SUFFIX)

    @property
    def eot(self) -> bool:
        return self.method.endswith(EOT_SUFFIX)

    @property
    def id(self) -> str:
        return "clean" if self.is_clean else slug(f"{self.method}_eps{self.eps:g}")


CLEAN = Source("none", 0.0)


@dataclass(frozen=True)
class Cell:
    source: Source
    purification: str  # a normalised spec: "jpeg:75"
    scenario: str

    @property
    def id(self) -> str:
        return f"{self.source.id}__{slug(self.purification.replace(':', '-'))}__{self.scenario}"

    @property
    def purified_id(self) -> str:
        return purified_id(self.source, self.purification)


def purified_id(source: Source, purification: str) -> str:
    return f"{slug(purification.replace(':', '-'))}/{source.id}"


@dataclass(frozen=True)
class StudyGrid:
    methods: tuple[str, ...] = DEFAULT_METHODS
    eps: tuple[float, ...] = DEFAULT_EPS
    purifications: tuple[str, ...] = DEFAULT_PURIFICATIONS
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS

    def __post_init__(self):
        bad = [m for m in self.methods if m.removesuffix(EOT_SUFFIX) not in ALL_METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)} (append {EOT_SUFFIX} "
                             "for an EOT-robust protection)")
        if not self.methods or not self.eps:
            raise ValueError("a study needs at least one method and one eps")
        if any(not 0 < e <= 255 for e in self.eps):
            raise ValueError(f"eps must be in (0, 255] pixel units, got {self.eps}")
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad or not self.scenarios:
            raise ValueError(f"unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS)}")
        units = parse_purifications(self.purifications)  # validates every spec
        if not units:
            raise ValueError("a study needs at least one purification (e.g. none)")
        object.__setattr__(self, "purifications", tuple(u.spec for u in units))  # normalised: "jpeg:75"
        slugs = [slug(p.replace(":", "-")) for p in self.purifications]
        if len(set(slugs)) != len(slugs):  # e.g. cat:100:advdm and cat:100:advdm- would share their files
            raise ValueError(f"purifications {self.purifications} would share file names ({slugs}): drop one")
        for name in ("methods", "eps", "scenarios"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} listed twice: {values}")

    @property
    def protections(self) -> list[Source]:
        return [Source(m, float(e)) for m in self.methods for e in self.eps]

    @property
    def sources(self) -> list[Source]:
        return [CLEAN, *self.protections]

    def purified(self) -> list[tuple[Source, str]]:
        return [(s, p) for p in self.purifications for s in self.sources]

    def cells(self) -> list[Cell]:
        """Every cell, baselines first (the protected cells need their baseline's values)."""
        return [Cell(s, p, sc) for s in self.sources for p in self.purifications for sc in self.scenarios]
