"""A trial: everything one training run needs, as one validated config (and one YAML file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from moe_core.accounting import training_steps
from moe_core.config import ModelConfig, StrictConfig
from moe_core.data.config import DataConfig
from moe_core.errors import ConfigError
from moe_core.train.config import TrainConfig
from moe_core.yaml_io import load_yaml


class TrialConfig(StrictConfig):
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    seed: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _check(self) -> "TrialConfig":
        per_step = self.train.micro_batch_size * self.model.seq_len
        if self.train.batch_tokens % per_step:
            raise ValueError(
                f"train.batch_tokens ({self.train.batch_tokens}) must be a multiple of "
                f"micro_batch_size * model.seq_len ({self.train.micro_batch_size} * {self.model.seq_len})"
            )
        return self

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step for one worker."""
        return self.train.batch_tokens // (self.train.micro_batch_size * self.model.seq_len)

    @property
    def total_steps(self) -> int:
        """Optimizer steps (`moe_core.accounting.training_steps`, the rule the planner uses too)."""
        return training_steps(self.model, self.train)


def load_trial_config(path: str | Path) -> TrialConfig:
    """A trial YAML (`model`, `train`, `data`, `seed`); errors name the file and key."""
    try:
        return TrialConfig.from_dict(load_yaml(path))
    except ConfigError as err:
        if err.where and err.where != "TrialConfig":
            raise
        raise ConfigError(err.detail, where=str(path), path=err.path) from None
