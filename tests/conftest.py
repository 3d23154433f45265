"""Tiny configs shared by the tests: small enough that the whole suite runs in seconds on CPU."""

from __future__ import annotations

from typing import Any

import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter; this must be set before
# any @triton.jit function is defined (moe_core imports its kernels lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moe_core import ModelConfig, MoEConfig

TINY = dict(vocab_size=48, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48, seq_len=16)


def tiny(moe: dict[str, Any] | None = None, **model: Any) -> ModelConfig:
    """A 4-layer, d=32 model config; `moe` is a MoEConfig dict."""
    return ModelConfig(**{**TINY, **model}, moe=MoEConfig(**(moe or {})))


def layer_forward(ffn, x, run=None):
    """One MoE layer's forward outside a model forward (`run`: the layer, or a compiled one):
    its output and the routing record it reports to the model's `MoEParts`."""
    ffn.parts.begin()
    try:
        y = (ffn if run is None else run)(x)
    finally:
        records = ffn.parts.end()
    return y, records[-1]


def experts(n: int, k: int, g: float | str = 1.0) -> dict[str, Any]:
    return {"num_experts": n, "top_k": k, "granularity": g}


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A token cache of the built-in corpus with the byte tokenizer, built once per test run."""
    from moe_core.data.config import DataConfig
    from moe_core.data.tokens import prepare_tokens

    path = tmp_path_factory.mktemp("cache")
    prepare_tokens(DataConfig(tokenizer="bytes", cache_dir=str(path)))
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
