"""Where the project keeps what it builds once and reuses: tokenizers, token arrays, corpora."""

from __future__ import annotations

import os
from pathlib import Path

from moe_core.data.config import DataConfig


def cache_root(cfg: DataConfig) -> Path:
    """`data.cache_dir`, else $MOE_SWEEP_CACHE, else ~/.cache/moe-sweep."""
    root = cfg.cache_dir or os.environ.get("MOE_SWEEP_CACHE") or Path.home() / ".cache" / "moe-sweep"
    return Path(root).expanduser().resolve()
