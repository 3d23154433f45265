"""Hooks through which a caller (the orchestrator's Ray Tune trainable) follows a trial, so
`moe_core` never imports Ray or MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn


class TrainCallback:
    """Override what you need; every hook is a no-op by default."""

    def on_tokenising(self, source: str, tokens: int) -> None:
        """While the corpus is tokenised into the cache (first use only): tokens written so far."""

    def on_step(self, step: int, row: dict[str, Any], model: nn.Module) -> None:
        """After each optimizer step, with that step's metrics row."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation (validation losses, perplexity)."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After a checkpoint has been written (atomically) to `path`."""
