"""Atomic checkpoints: written to a temporary file, then renamed, so a crash never leaves a
half-written one; `latest` names the newest. The two newest are kept."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "moe-sweep-checkpoint-v1"
KEEP = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, or from another trial."""


def save_checkpoint(directory: Path, step: int, state: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step{step:08d}.pt"
    tmp = directory / f".{path.name}.tmp"
    torch.save({"format": FORMAT, "step": step, **state}, tmp)
    os.replace(tmp, path)
    pointer = directory / ".latest.tmp"
    pointer.write_text(path.name)
    os.replace(pointer, directory / "latest")
    for old in sorted(directory.glob("step*.pt"))[:-KEEP]:
        old.unlink()
    return path


def load_latest(directory: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The newest checkpoint's state, or None if there is none. Raises `CheckpointError` if it is
    unreadable or was written by a trial with a different config."""
    pointer = directory / "latest"
    if not pointer.exists():
        return None
    path = directory / pointer.read_text().strip()
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(err).__name__}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a moe-sweep checkpoint")
    if state.get("config") != config:
        raise CheckpointError(f"{path}: written by a trial with a different config; use another --out folder")
    return state
