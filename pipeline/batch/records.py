"""What a protection run says about itself, from its typed settings only.

`RunRecord(run_id, config, model)` holds the run's `ProtectConfig` and `ModelSpec`; the three
places that record protection parameters are all built from it, so they cannot drift:

- `sample_params()`  the ``mimicshield`` object added to each protected sample's JSON metadata,
- `metric_row(...)`  one row of the ``protect_metrics`` table,
- `config_json(...)` the ``config`` column of the ``runs`` table (with the run options).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata

from pipeline.models.loading import ModelSpec
from pipeline.protect.engine import ProtectConfig


def package_version() -> str | None:
    try:
        return metadata.version("mimicshield")
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    config: ProtectConfig
    model: ModelSpec
    version: str | None = None

    def params(self) -> dict:
        """Protection parameters and model: method, eps, step_size, steps, init, seed, resolution, model, model_revision."""
        return {**self.config.record(), "model": self.model.model, "model_revision": self.model.revision}

    def sample_params(self) -> dict:
        """The ``mimicshield`` field of each sample's JSON: `params()`, every model of an ensemble, version, run."""
        return {**self.params(), "models": self.model.model_ids, "version": self.version, "run_id": self.run_id}

    def metric_row(self, key: str, source: str, output: str, fmt: str, measured: dict) -> dict:
        """A protect_metrics row: the sample, where it was written, its measurements and the run's parameters.

        `measured` holds width, height, linf, psnr, ssim, lpips, seconds, device, warnings.
        """
        return {"key": key, "source": source, "output": output, "format": fmt, **self.params(), **measured,
                "run_id": self.run_id}

    def config_json(self, **run_options) -> str:
        return json.dumps({"protect": self.config.to_dict(), "model": self.model.to_dict(),
                           "models": self.model.model_ids, **run_options},
                          sort_keys=True, allow_nan=False)
