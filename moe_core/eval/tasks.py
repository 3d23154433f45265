"""The task registry: a downstream task is a built-in name or a JSONL file of examples."""

from __future__ import annotations

import re
from pathlib import Path

from moe_core.errors import ConfigError
from moe_core.eval.bible_next_verse import bible_next_verse
from moe_core.eval.examples import MCExample, load_task

BUILTIN_TASKS = {"bible_next_verse": bible_next_verse}


def resolve_task(name_or_path: str, *, seed: int = 0, n: int | None = None) -> tuple[str, list[MCExample]]:
    """(task name, examples) of a built-in task or a JSONL task file (named after its stem).

    `n` caps the number of examples (None: the built-in task's default, or the whole file; a
    file's first `n` are kept, as lm-eval-harness's --limit). `seed` picks a built-in task's
    examples; a file's examples are fixed.
    """
    if name_or_path in BUILTIN_TASKS:
        build = BUILTIN_TASKS[name_or_path]
        return name_or_path, build(seed=seed) if n is None else build(n=n, seed=seed)
    path = Path(name_or_path)
    if path.suffix != ".jsonl" or not path.is_file():
        raise ConfigError(f"unknown task {name_or_path!r}: give a built-in task ({', '.join(BUILTIN_TASKS)}) "
                          "or the path of an existing .jsonl file")
    examples = load_task(path)
    return path.stem, examples if n is None else examples[:n]


def column_name(task: str) -> str:
    """A task name as it appears in column names (`acc_<task>`): SQL-friendly characters only."""
    return re.sub(r"[^A-Za-z0-9_]", "_", task)
