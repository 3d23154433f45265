"""Corpora, tokenizers and the memory-mapped token cache every trial of a sweep reads."""

from moe_core.data.config import DataConfig
from moe_core.data.tokens import TokenData, prepare_tokens

__all__ = ["DataConfig", "TokenData", "prepare_tokens"]
