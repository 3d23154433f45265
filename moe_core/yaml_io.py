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


class _LineLoader(yaml.SafeLoader):
    """`SafeLoader` that also remembers the line of every mapping key (still constructs plain
    Python types only). Lines are keyed by the tuple of keys leading to the value."""


def _record_lines(loader: _LineLoader, node: yaml.Node, prefix: tuple) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                path = prefix + (key_node.value,)
                if key_node.value in seen:  # safe_load would silently keep the last one
                    dotted = ".".join(str(p) for p in path)
                    raise ConfigError(f"line {key_node.start_mark.line + 1}: {dotted}: duplicate key")
                seen.add(key_node.value)
                loader.key_lines.setdefault(path, key_node.start_mark.line + 1)
                _record_lines(loader, value_node, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            loader.key_lines.setdefault(prefix + (i,), item.start_mark.line + 1)
            _record_lines(loader, item, prefix + (i,))


def load_yaml_with_lines(path: str | Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """Like `load_yaml`, plus a map from key paths (tuples of keys and list indices) to the
    1-based line where each key or list item starts, for error messages."""
    path = Path(path)
    data = load_yaml(path)  # all the error handling; the file is small, parsing twice is cheap
    loader = _LineLoader(path.read_text())
    loader.key_lines = {}
    try:
        node = loader.get_single_node()
        if node is not None:
            _record_lines(loader, node, ())
    except ConfigError as err:
        raise ConfigError(err.detail, where=str(path)) from None
    finally:
        loader.dispose()
    return data, loader.key_lines
