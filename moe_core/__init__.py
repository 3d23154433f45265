"""moe_core: the one MoE language model and trainer every trial runs. Imports no Ray/Optuna/MLflow."""

from moe_core.accounting import ParamCount, count_params
from moe_core.config import (
    BalanceConfig,
    ExpertSetConfig,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    study_moe,
)
from moe_core.errors import ConfigError
from moe_core.model import ModelOutput, MoETransformer, build_model

__all__ = [
    "BalanceConfig",
    "ConfigError",
    "ExpertSetConfig",
    "ModelConfig",
    "ModelOutput",
    "MoEConfig",
    "MoETransformer",
    "ParamCount",
    "RouterConfig",
    "build_model",
    "count_params",
    "study_moe",
]
