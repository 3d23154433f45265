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


def load_yaml_with_lines(path: str | Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """Like `load_yaml`, plus a map from key paths (tuples of keys and list indices) to the
    1-based line where each key or list item starts, for error messages. The lines and the
    duplicate-key check are ruamel.yaml's round-trip loader's (`.lc`); the values stay PyYAML's
    `safe_load`, so every file means what it always meant (YAML 1.1 scalars)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.constructor import DuplicateKeyError

    path = Path(path)
    data = load_yaml(path)  # all the other error handling; the file is small, parsing twice is cheap
    try:
        tree = YAML(typ="rt", pure=True).load(path.read_text())
    except DuplicateKeyError as err:  # safe_load would silently keep the last one
        key = err.problem.split('"')[1] if err.problem and err.problem.count('"') >= 2 else "?"
        raise ConfigError(f"line {err.problem_mark.line + 1}: {key}: duplicate key", where=str(path)) from None
    lines: dict[tuple, int] = {}
    _record_lines(tree, (), lines)
    return data, lines


def _record_lines(node: Any, prefix: tuple, lines: dict[tuple, int]) -> None:
    if hasattr(node, "lc") and isinstance(node, dict):
        for key, value in node.items():
            lines.setdefault(prefix + (key,), node.lc.key(key)[0] + 1)
            _record_lines(value, prefix + (key,), lines)
    elif hasattr(node, "lc") and isinstance(node, list):
        for i, item in enumerate(node):
            lines.setdefault(prefix + (i,), node.lc.item(i)[0] + 1)
            _record_lines(item, prefix + (i,), lines)
