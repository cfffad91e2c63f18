"""The fine-tuning recipe schema, version 1: typed, strict, frozen pydantic models.

Strict means a YAML value must already have the right type: ``lr: fast`` and ``steps: true`` are
errors, ``lr: 1`` (an int where a float is expected) is fine. Unknown keys are errors. Cross-field
rules raise :class:`RuleError`, which names the field that breaks the rule so the loader can point
at its line. The models are frozen: derive a changed recipe with ``--set`` overrides
(:func:`normswap.recipe.load.load_recipe`) or ``recipe.model_copy(update=...)``.
"""

from __future__ import annotations

import difflib
import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WrapValidator, model_validator
from pydantic_core import PydanticCustomError, ValidationError

SCHEMA_VERSION = 1


class RuleError(ValueError):
    """A cross-field rule broken by ``field`` (a key of the model being validated, or '' for the model)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False,
                              validate_by_name=True, validate_by_alias=True)


def show_value(value: Any) -> str:
    """A value as the user wrote it in YAML: 'text', true, null, 3, a list, a mapping."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value) if isinstance(value, (int, float)) else str(value)


def _option_value(value: Any, handler: Any) -> Any:
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError("option_value", "expected a string, number or true/false, got {got}",
                                  {"got": show_value(value)}) from None


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


OptionValue = Annotated[Union[str, int, float, bool], WrapValidator(_option_value)]
UnitOpen = Annotated[float, Field(ge=0, lt=1)]
Betas = Annotated[tuple[UnitOpen, UnitOpen], BeforeValidator(_list_to_tuple)]
PositiveFloat = Annotated[float, Field(gt=0)]


class ModelSection(_Section):
    """Which network to convert."""

    source: str = Field(description='A normswap model spec: "mobilenet_v2", "timm:resnet18", '
                                    '"examples/fmnist_cnn.py:build", "pkg.mod:factory", "hf:PATH".')
    weights: str | None = Field(None, description='Torchvision weights name, "none", or a .safetensors/.pt '
                                                  "file; null = the source's default.")


class ConvertSection(_Section):
    """The surgery: which variant replaces which layers."""

    to: str = Field(description="Variant name (see `normswap variants`): uan, patchnorm, anact, ...")
    targets: list[str] = Field(default_factory=list, description="Layer patterns to convert (empty = the variant's default sites).")
    exclude: list[str] = Field(default_factory=list, description="Layer patterns to leave alone.")
    options: dict[str, OptionValue] = Field(default_factory=dict, description="Variant options, e.g. {k: 5} for uan.")

    @model_validator(mode="after")
    def _known_variant(self) -> ConvertSection:
        from normswap.variants import registry

        known = registry.names()
        if self.to not in known:
            close = difflib.get_close_matches(self.to, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RuleError("to", f"unknown variant '{self.to}'{hint}; known variants: {', '.join(known)}")
        return self


class DataSection(_Section):
    """Where training, calibration and evaluation data come from."""

    spec: str | None = Field(None, description="Data spec (normswap.data.open_data); null = the model's default data.")
    image_size: int | None = Field(None, ge=1, description="Input side length in pixels; null = the data's default.")
    mean: list[float] | None = Field(None, description="Per-channel normalisation mean; null = the data's default.")
    std: list[PositiveFloat] | None = Field(None, description="Per-channel normalisation std (each > 0); null = the data's default.")


class CalibrateSection(_Section):
    """Fitting the converted layers' statistics from data."""

    enabled: bool = Field(True, description="Fit the converted layers' statistics from data before training (and again where refit says).")
    samples: int = Field(256, ge=1, description="Calibration items.")
    batch_size: int = Field(32, ge=1, description="Calibration batch size.")
    refit: Literal["start", "stages", "never"] = Field(
        "start", description="Fit statistics once before training, again at every stage boundary of a step schedule, or never.")
    reestimate_bn: bool = Field(False, description="Re-estimate remaining BatchNorm running statistics.")
    em_init: Literal["quantile", "kmeans++"] = Field("quantile", description="Initialisation of the EM fit of mixture statistics.")
    em_samples: int = Field(4096, ge=2, description="Values per site kept for the EM fit.")
    em_tol: float = Field(1e-4, gt=0, description="EM convergence tolerance.")


class OptimizerSection(_Section):
    """The optimizer and its settings."""

    name: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum (sgd only).")
    betas: Betas = Field((0.9, 0.999), description="Adam/AdamW betas, each in [0, 1).")


class LrScheduleSection(_Section):
    """Learning-rate schedule: warm-up, then the shape down to min_lr."""

    shape: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay shape after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps from 0 to lr.")
    min_lr: float = Field(0.0, ge=0, description="Learning rate at the end of the decay.")


class FinetuneSection(_Section):
    """The training run: budget, batch, optimizer, schedule, trainable parameters."""

    steps: int | None = Field(None, ge=1, description="Optimizer steps (exactly one of steps / epochs).")
    epochs: float | None = Field(None, gt=0, description="Passes over the training data (exactly one of steps / epochs).")
    batch_size: int = Field(32, ge=1, description="Batch size per process.")
    train_samples: int | None = Field(
        None, ge=1, description="Training items to draw (generated sources) / cap (finite ones); null = the whole "
                                "training part, or 100 x batch_size for generated sources.")
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection, description="The optimizer and its settings.")
    lr_schedule: LrScheduleSection = Field(default_factory=LrScheduleSection, description="Learning-rate schedule.")
    trainable: Literal["all", "new", "norms"] = Field(
        "all", description="Which parameters train: every parameter / only the converted layers' / only norm-like and converted layers'.")
    grad_clip: float | None = Field(1.0, gt=0, description="Gradient-norm clip; null = no clipping.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast precision on GPU.")
    log_every: int = Field(10, ge=1, description="Steps between log lines.")

    @model_validator(mode="after")
    def _budget(self) -> FinetuneSection:
        if self.steps is not None and self.epochs is not None:
            raise RuleError("epochs", "give either steps or epochs, not both")
        if self.steps is None and self.epochs is None:
            raise RuleError("", "give the training budget: steps or epochs")
        return self

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: ``steps``, or ``ceil(epochs * steps_per_epoch)`` (at least 1)."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        return max(1, math.ceil(self.epochs * steps_per_epoch))


class StrengthSection(_Section):
    """The strength schedule: 0 = the original network, 1 = the paper's layer (docs/methods.md section 0)."""

    from_: float = Field(0.0, alias="from", ge=0, le=1, description="Strength before the ramp.")
    to: float = Field(1.0, ge=0, le=1, description="Strength after the ramp.")
    start: int = Field(0, ge=0, description="The step where the ramp begins.")
    span: int | None = Field(None, ge=1, description="Steps the ramp takes; null = 3/4 of the training steps minus start.")
    shape: Literal["linear", "cosine", "step", "log"] = Field("linear", description="Ramp shape.")
    stages: int = Field(5, ge=1, description="Step shape: number of stairs (equally spaced from..to) unless levels is given.")
    levels: list[float] | None = Field(None, description="Step shape: explicit stair values, e.g. [0.001, 0.01, 0.1, 0.3, 1].")
    log_min: float = Field(0.001, gt=0, lt=1, description="Log shape: the first non-zero strength.")

    @model_validator(mode="after")
    def _levels(self) -> StrengthSection:
        if self.levels is None:
            return self
        if self.shape != "step":
            raise RuleError("levels", f"needs shape: step (shape is '{self.shape}')")
        if not self.levels:
            raise RuleError("levels", "is empty; give at least one stair value or leave it out")
        lo, hi = sorted((self.from_, self.to))
        for i, value in enumerate(self.levels):
            if not lo <= value <= hi:
                raise RuleError(f"levels[{i}]", f"{value:g} is outside [from, to] = [{lo:g}, {hi:g}]")
            if i and value <= self.levels[i - 1]:
                raise RuleError(f"levels[{i}]", f"must increase ({value:g} after {self.levels[i - 1]:g})")
        return self

    def resolved_span(self, total_steps: int) -> int:
        """Ramp length in steps: ``span``, or 3/4 of ``total_steps`` minus ``start`` (at least 1)."""
        if self.span is not None:
            return self.span
        return max(1, int(0.75 * total_steps) - self.start)


class DistillSection(_Section):
    """Distillation from the unconverted original."""

    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the KL term.")
    kl_weight: float = Field(1.0, ge=0, description="KL(original || converted) on logits at the temperature.")
    label_weight: float = Field(0.0, ge=0, description="Cross-entropy with the data's labels.")
    feature_weight: float = Field(0.0, ge=0, description="MSE between the converted sites' outputs and the original's at the same points.")

    @model_validator(mode="after")
    def _some_loss(self) -> DistillSection:
        if self.kl_weight + self.label_weight + self.feature_weight <= 0:
            raise RuleError("", "kl_weight + label_weight + feature_weight must be > 0 (there is nothing to train on)")
        return self


class EvalSection(_Section):
    """Evaluation during and after training."""

    samples: int = Field(256, ge=1, description="Evaluation items.")
    batch_size: int = Field(64, ge=1, description="Evaluation batch size.")
    every: int = Field(0, ge=0, description="Evaluate every N steps (0 = only at the end).")


class OutputSection(_Section):
    """Where results go."""

    path: str = Field(description="The final model (.safetensors).")
    checkpoint_every: int = Field(100, ge=0, description="Steps between resumable checkpoints (0 = only at the end).")
    plot: bool = Field(True, description="Write a PNG of loss, strength and agreement over steps.")


class Recipe(_Section):
    """A normswap fine-tuning recipe (schema version 1)."""

    model_config = ConfigDict(title="normswap recipe")

    version: Literal[1] = Field(1, description="Recipe schema version.")
    seed: int = Field(0, ge=0, description="Seed of every random choice (data order, init of new layers, crops).")
    model: ModelSection = Field(description="Which network to convert.")
    convert: ConvertSection = Field(description="The surgery: variant, targets, exclude, options.")
    data: DataSection = Field(default_factory=DataSection, description="Data spec and preprocessing.")
    calibrate: CalibrateSection = Field(default_factory=CalibrateSection, description="Statistics fitting.")
    finetune: FinetuneSection = Field(description="The training run.")
    strength: StrengthSection = Field(default_factory=StrengthSection, description="The strength schedule.")
    distill: DistillSection = Field(default_factory=DistillSection, description="Distillation losses.")
    eval: EvalSection = Field(default_factory=EvalSection, description="Evaluation.")
    output: OutputSection = Field(description="Outputs and checkpoints.")
    control: bool = Field(True, description="Also fine-tune the unconverted original with the same budget and data, for comparison.")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict with every default filled in and the YAML key names (``from``)."""
        return self.model_dump(mode="json", by_alias=True)
