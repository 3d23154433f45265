"""moe_core: the one MoE language model and trainer every trial runs. Imports no Ray/Optuna/MLflow.

The names below load on first use (PEP 562), so `import moe_core.files` or `moe_core.errors` does
not import torch: the analysis layer and the sweep driver use those without paying for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOME = {
    "ParamCount": "moe_core.accounting",
    "count_params": "moe_core.accounting",
    "BalanceConfig": "moe_core.config",
    "ExpertSetConfig": "moe_core.config",
    "ModelConfig": "moe_core.config",
    "MoEConfig": "moe_core.config",
    "RouterConfig": "moe_core.config",
    "study_moe": "moe_core.config",
    "ConfigError": "moe_core.errors",
    "ModelOutput": "moe_core.model",
    "MoETransformer": "moe_core.model",
    "build_model": "moe_core.model",
}
__all__ = [
    "BalanceConfig", "ConfigError", "ExpertSetConfig", "ModelConfig", "ModelOutput", "MoEConfig",
    "MoETransformer", "ParamCount", "RouterConfig", "build_model", "count_params", "study_moe",
]

if TYPE_CHECKING:
    from moe_core.accounting import ParamCount, count_params
    from moe_core.config import BalanceConfig, ExpertSetConfig, ModelConfig, MoEConfig, RouterConfig, study_moe
    from moe_core.errors import ConfigError
    from moe_core.model import ModelOutput, MoETransformer, build_model


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'moe_core' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
