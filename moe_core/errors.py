"""Errors a user can act on.

A `ConfigError` is raised for any bad configuration value. Its message is one line naming the
key, the value and what is allowed, so command-line front ends can print it without a traceback.
"""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""

    def __init__(self, detail: str, *, where: str = "", path: str = "") -> None:
        self.detail, self.where, self.path = detail, where, path
        prefix = f"{where}: " if where else ""
        key = f"{path}: " if path else ""
        super().__init__(f"{prefix}{key}{detail}")

    @classmethod
    def from_validation(cls, err: ValidationError, where: str = "") -> "ConfigError":
        """Condense pydantic's multi-line report to its first problem, on one line."""
        first = err.errors()[0]
        loc = [str(p) for p in first["loc"]]
        inner = first.get("ctx", {}).get("error")
        if isinstance(inner, ConfigError):  # a nested config already said what is wrong
            loc, msg = loc + [inner.path] if inner.path else loc, inner.detail
        elif first["type"] == "extra_forbidden":
            msg = "unknown key"
        elif first["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = first["msg"].removeprefix("Value error, ")
        more = len(err.errors()) - 1
        tail = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
        return cls(msg + tail, where=where, path=".".join(loc))
