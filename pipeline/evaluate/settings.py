"""`EvalSettings`: one evaluation run, typed and validated once (model as a `ModelSpec`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pipeline.evaluate.mimic import (
    DEFAULT_SCENARIOS,
    SCENARIOS,
    DreamBoothConfig,
    InpaintConfig,
    LoraConfig,
    SDEditConfig,
    TextualInversionConfig,
)
from pipeline.io.storage import S3Options
from pipeline.metrics.mimicry import MetricConfig
from pipeline.models.loading import ModelSpec, inpaint_model_for


@dataclass
class EvalSettings:
    protected: str
    clean: str
    output: str
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    group_by: str = "artist"
    model: ModelSpec = field(default_factory=ModelSpec)  # the mimic model: id, revision, device, dtype
    inpaint_model: str | None = None  # None: the model's inpainting twin (tiny -> tiny-inpaint, SD 1.5 -> its inpainting)
    method: str | None = None  # override / fill in the protection method of the protected samples
    eps: float | None = None
    run: str | None = None
    prompt: str = "a photo"
    sdedit: SDEditConfig = field(default_factory=SDEditConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    metrics: MetricConfig = field(default_factory=MetricConfig)
    save_images: bool = False  # write the training mimics' generated images (OUTPUT/generated/)
    samples_per_group: int = 4  # sample grids written per (scenario, group) by each actor
    batch_size: int = 4
    actors: int | None = None
    address: str | None = None
    verbose: bool = False  # Ray's own logs and operator progress bars on the terminal (cluster/logs.py)
    progress: bool = True  # one bar of pairs, drawn when stderr is a terminal (batch/progress.py)
    s3: S3Options = field(default_factory=S3Options)  # a dict is converted once

    def __post_init__(self):
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad:
            raise ValueError(f"unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS)}")
        self.s3 = S3Options.of(self.s3)
        if isinstance(self.model, str):  # a model name: the defaults for everything else
            self.model = ModelSpec(self.model)
        if not isinstance(self.model, ModelSpec):
            raise TypeError(f"model must be a ModelSpec, got {type(self.model).__name__}")
        if len(self.model.model_ids) > 1:
            raise ValueError(f"--model {self.model.model}: evaluation mimics one model, not an ensemble")
        if "textual_inversion" in self.scenarios and self.model.family in ("sd3", "flux"):
            raise ValueError(f"--model {self.model.model} is an {self.model.family.upper()} model: textual inversion "
                             "(a T5 token) is not implemented for it; pass --scenario sdedit,inpaint,lora")

    @property
    def inpaint_spec(self) -> ModelSpec:
        """The inpainting model, on the mimic model's device and dtype (its revision when it is the same model)."""
        name = self.inpaint_model or inpaint_model_for(self.model.model)
        return replace(self.model, model=name, revision=self.model.revision if name == self.model.model else None,
                       low_memory=False)
