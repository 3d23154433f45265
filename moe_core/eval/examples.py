"""Multiple-choice examples and the JSONL task files they come from (no torch: the planner and
config validation read these).

Task files are JSONL, one example per line:
    {"context": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0, "id": "q1"}
Each choice string is scored exactly as given after the context, so the separator between them
belongs to the choice (" Paris", "\\nverse ..."); see `multiple_choice` for the scoring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moe_core.errors import ConfigError

REQUIRED_KEYS = ("context", "choices", "label")
ALLOWED_KEYS = (*REQUIRED_KEYS, "id")


@dataclass(frozen=True)
class MCExample:
    context: str
    choices: list[str]
    label: int  # index of the correct choice
    id: str | None = None


def load_task(path: Path) -> list[MCExample]:
    """The examples of a JSONL task file; any bad line raises a one-line `ConfigError` naming
    `file:line`, what is wrong and what is allowed. Blank lines are skipped."""
    path = Path(path)
    try:
        raw_lines = path.read_bytes().splitlines()
    except OSError as err:
        raise ConfigError(f"cannot read the task file ({err.strerror})", where=str(path)) from None
    examples = []
    for lineno, raw in enumerate(raw_lines, 1):
        if raw.strip():
            examples.append(_parse_line(raw, f"{path}:{lineno}"))
    if not examples:
        raise ConfigError("the task file has no examples; expected one JSON object per line", where=str(path))
    return examples


def _parse_line(raw: bytes, where: str) -> MCExample:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("not valid UTF-8", where=where) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"invalid JSON ({err.msg} at column {err.colno})", where=where) from None
    if not isinstance(record, dict):
        raise ConfigError(f"expected a JSON object with keys {', '.join(ALLOWED_KEYS)}", where=where)
    unknown = sorted(set(record) - set(ALLOWED_KEYS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; allowed: {', '.join(ALLOWED_KEYS)}", where=where)
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ConfigError(f"missing key {missing[0]!r}; required: {', '.join(REQUIRED_KEYS)}", where=where)
    context, choices, label, ex_id = record["context"], record["choices"], record["label"], record.get("id")
    if not isinstance(context, str):
        raise ConfigError(f"context must be a string, not {_json_type(context)}", where=where)
    if not isinstance(choices, list) or not choices:
        raise ConfigError("choices must be a non-empty list of strings", where=where)
    for j, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            what = "an empty string" if choice == "" else _json_type(choice)
            raise ConfigError(f"choices[{j}] must be a non-empty string, not {what}", where=where)
    if isinstance(label, bool) or not isinstance(label, int):  # JSON true would pass as int 1
        raise ConfigError(f"label must be an integer, not {_json_type(label)}", where=where)
    if not 0 <= label < len(choices):
        raise ConfigError(
            f"label {label} is out of range for {len(choices)} choices (allowed 0..{len(choices) - 1})", where=where
        )
    if ex_id is not None and not isinstance(ex_id, str):
        raise ConfigError(f"id must be a string or null, not {_json_type(ex_id)}", where=where)
    return MCExample(context=context, choices=choices, label=label, id=ex_id)


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), "null")
