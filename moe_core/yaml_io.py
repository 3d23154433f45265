"""Reading YAML config files safely, with errors that name the file.

Only `yaml.safe_load` is used: nothing in a YAML file is ever executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from moe_core.config import ModelConfig
from moe_core.errors import ConfigError


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The file's top-level mapping; `ConfigError` naming the file (and line) otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", where=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{line}invalid YAML ({getattr(err, 'problem', err)})", where=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of keys at the top level", where=str(path))
    return data


def load_model_config(path: str | Path) -> ModelConfig:
    """The `model:` section of a trial config file, validated."""
    data = load_yaml(path)
    if "model" not in data:
        raise ConfigError("model: required key is missing", where=str(path))
    try:
        return ModelConfig.from_dict(data["model"])
    except ConfigError as err:
        raise ConfigError(err.detail, where=str(path), path=".".join(p for p in ("model", err.path) if p)) from None
