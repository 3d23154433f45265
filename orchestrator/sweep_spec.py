"""The sweep YAML's schema (docs/sweeps.md describes it for users).

Only the sweep's own keys are typed here; `base` is a trial description (scale, study knobs,
model, train, data) that the planner validates by resolving it, and `parameters` maps dotted
paths into `base` to the values or ranges they take.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from moe_core.config import StrictConfig
from orchestrator.hardware import HARDWARE

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)]


class MetricSpec(StrictConfig):
    name: str = "val_loss"  # a column of the steps table reported at evaluations
    goal: Literal["minimize", "maximize"] = "minimize"  # also Optuna's name for the direction

    @property
    def mode(self) -> Literal["min", "max"]:
        """Ray Tune's name for the goal."""
        return "min" if self.goal == "minimize" else "max"


class ResourcesSpec(StrictConfig):
    cpus: Annotated[float, Field(gt=0)] = 1.0  # per worker
    gpus: Annotated[float, Field(ge=0)] = 0.0  # per worker; fractions share a GPU
    # Data-parallel workers per trial. Unset on a GPU sweep: each trial gets its own count from
    # the planner (`orchestrator.shapes`: the fewest that fit, raised while a trial would run
    # longer than `max_hours`); unset on a CPU sweep: 1. A number fixes it for every trial.
    workers: Annotated[int, Field(ge=1)] | None = None
    # How a trial's weights, gradients and optimizer states are spread over its workers: `none`
    # (DDP: replicated), `fsdp` (FSDP2: sharded) or `auto`, the smallest that the memory plan
    # says fits the sweep's GPU (moe_core.memory); a trial that fits nowhere is skipped.
    sharding: Literal["auto", "none", "fsdp"] = "auto"
    gpus_per_node: Annotated[int, Field(ge=1)] = 8  # the cluster's nodes: a trial up to a node is placed on one
    # A trial planned longer than this gets more workers (while `min_efficiency` holds): a day
    # keeps the longest trial far below a study's wall time on a few nodes, and bounds what a lost
    # node can cost between checkpoints.
    max_hours: Annotated[float, Field(gt=0)] = 24.0
    min_efficiency: Annotated[float, Field(gt=0, le=1)] = 0.8  # data-parallel efficiency floor when raising


class EarlyStoppingSpec(StrictConfig):
    type: Literal["asha"] = "asha"
    grace_period: Annotated[int, Field(ge=1)] = 1  # evaluations before a trial may be stopped
    reduction_factor: Annotated[float, Field(gt=1)] = 3.0


class ParameterSpec(StrictConfig):
    """One swept key: `values` (a grid axis, or a categorical choice for random/bayes), a range
    (`distribution` with `min` and `max`, random/bayes only) or named `variants` (bundles of
    dotted keys set together, e.g. a UniPool recipe against a vanilla one)."""

    values: list[Any] | None = None
    distribution: Literal["uniform", "log_uniform", "int", "int_log_uniform", "categorical"] | None = None
    min: float | None = None
    max: float | None = None
    variants: dict[str, dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _check(self) -> "ParameterSpec":
        is_range = self.distribution not in (None, "categorical")
        forms = [self.values is not None, is_range, self.variants is not None]
        if sum(forms) != 1:
            raise ValueError("give exactly one of `values`, a range (`distribution`, `min`, `max`) or `variants`")
        if self.values is not None and not self.values:
            raise ValueError("values: empty list (a grid axis needs at least one value)")
        if self.variants is not None:
            if not self.variants:
                raise ValueError("variants: empty mapping")
            for label, keys in self.variants.items():
                if not isinstance(keys, dict) or not keys:
                    raise ValueError(f"variants.{label}: expected a non-empty mapping of dotted keys to values")
        if is_range:
            if self.min is None or self.max is None:
                raise ValueError(f"distribution '{self.distribution}' needs both min and max")
            if not self.min < self.max:
                raise ValueError(f"min ({self.min:g}) must be less than max ({self.max:g})")
            if self.distribution in ("log_uniform", "int_log_uniform") and self.min <= 0:
                raise ValueError(f"distribution '{self.distribution}' needs min > 0")
        elif self.min is not None or self.max is not None:
            raise ValueError("min and max need a range distribution (uniform, log_uniform, int, int_log_uniform)")
        return self

    @property
    def is_range(self) -> bool:
        return self.distribution not in (None, "categorical")

    @property
    def choices(self) -> list[Any]:
        """The discrete options: values, or variant labels."""
        return list(self.variants) if self.variants is not None else list(self.values or [])


class SweepSpec(StrictConfig):
    name: Name
    description: str = ""
    method: Literal["grid", "random", "bayes"] = "grid"
    metric: MetricSpec = MetricSpec()
    objectives: tuple[MetricSpec, ...] = ()  # bayes: several metrics make it multi-objective
    sampler: Literal["tpe", "gp", "random"] = "tpe"  # bayes: Optuna sampler
    trials: Annotated[int, Field(ge=1)] | None = None  # random/bayes: number of sampled points
    search_seed: Annotated[int, Field(ge=0)] = 0  # random sampling and Optuna
    seeds: list[Annotated[int, Field(ge=0)]] | Annotated[int, Field(ge=1)] = [0]  # a list, or a count
    resources: ResourcesSpec = ResourcesSpec()
    max_concurrent: Annotated[int, Field(ge=1)] | None = None  # None: as many as resources allow
    retries: Annotated[int, Field(ge=0)] = 0  # re-runs of a failed trial (from its checkpoint)
    early_stopping: EarlyStoppingSpec | None = None
    hardware: str | None = None  # for run-time estimates; default: the scale's
    expert_alignment: Annotated[int, Field(ge=1)] = 8  # expert widths must be multiples of this
    max_total_params: Annotated[float, Field(gt=0)] | None = None  # skip larger models
    base: dict[str, Any]
    parameters: dict[str, ParameterSpec] = {}

    @field_validator("hardware")
    @classmethod
    def _known_hardware(cls, value: str | None) -> str | None:
        if value is not None and value not in HARDWARE:
            raise ValueError(f"unknown hardware '{value}'; allowed: {', '.join(HARDWARE)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> "SweepSpec":
        if self.method == "grid":
            if self.trials is not None:
                raise ValueError("trials is for method random or bayes; a grid runs every combination")
            if self.objectives:
                raise ValueError("objectives is for method bayes")
        elif self.trials is None:
            raise ValueError(f"method '{self.method}' needs trials (the number of points to sample)")
        if isinstance(self.seeds, list) and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError("seeds must be a non-empty list of distinct integers, or a count")
        return self

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def metrics(self) -> tuple[MetricSpec, ...]:
        """What the search optimises: `objectives` when given, else `metric`."""
        return self.objectives or (self.metric,)
