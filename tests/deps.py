"""Test modules whose dependencies go beyond moe_core's.

A GPU machine runs `pytest -m gpu tests` with moe_core's dependencies only (no Ray, MLflow,
matplotlib or transformers; see ../shared/gpu), and every test module is imported to collect it, so
a module that needs more is skipped there instead of failing the collection. `make test` sets
MOE_SWEEP_TEST_ALL_DEPS=1, under which a missing dependency is an error: CI never skips silently.
"""

from __future__ import annotations

import importlib
import os

import pytest


def require(*modules: str) -> None:
    """Import `modules` or skip the calling test module (an error under MOE_SWEEP_TEST_ALL_DEPS=1)."""
    for name in modules:
        if os.environ.get("MOE_SWEEP_TEST_ALL_DEPS") == "1":
            importlib.import_module(name)
        else:
            pytest.importorskip(name)
