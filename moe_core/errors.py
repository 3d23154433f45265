"""Errors a user can act on.

A `ConfigError` is raised for any bad configuration value. Its message is one line naming the
key, the value and what is allowed, so command-line front ends can print it without a traceback.
"""

from __future__ import annotations

import difflib
import typing

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""

    def __init__(self, detail: str, *, where: str = "", path: str = "", unknown_key: bool = False) -> None:
        self.detail, self.where, self.path, self.unknown_key = detail, where, path, unknown_key
        prefix = f"{where}: " if where else ""
        key = f"{path}: " if path else ""
        super().__init__(f"{prefix}{key}{detail}")

    @classmethod
    def from_validation(
        cls, err: ValidationError, where: str = "", model: type[BaseModel] | None = None
    ) -> "ConfigError":
        """Condense pydantic's multi-line report to one line: unknown keys first (usually a typo
        that also causes the 'missing' errors), else the first problem."""
        errors = err.errors()
        first = next((e for e in errors if _is_unknown_key(e)), errors[0])
        loc = [str(p) for p in first["loc"]]
        inner = first.get("ctx", {}).get("error")
        if isinstance(inner, ConfigError):  # a nested config already said what is wrong
            loc, msg = loc + [inner.path] if inner.path else loc, inner.detail
        elif first["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, first["loc"][:-1]) if model else []
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            msg = "unknown key" + (f"; did you mean '{close[0]}'?" if close else "")
            if allowed and not close:
                msg += f"; allowed: {', '.join(allowed)}"
        elif first["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = first["msg"].removeprefix("Value error, ")
        more = len(errors) - 1
        tail = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
        return cls(msg + tail, where=where, path=".".join(loc), unknown_key=_is_unknown_key(first))


def _is_unknown_key(error: dict) -> bool:
    inner = error.get("ctx", {}).get("error")
    return error["type"] == "extra_forbidden" or (isinstance(inner, ConfigError) and inner.unknown_key)


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The config class inside an annotation like `X`, `X | None` or `tuple[X, ...]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):  # () for anything that is not a union or generic
        found = _model_in(arg)
        if found:
            return found
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the config reached by following `loc` (keys and list indices) from `model`."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if current else None
        current = _model_in(field.annotation) if field else None
        if current is None:
            return []
    return sorted(current.model_fields)
