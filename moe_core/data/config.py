"""Which corpus a trial trains on, how it is tokenised and held out."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from moe_core.config import StrictConfig


class DataConfig(StrictConfig):
    """`source`: `bible` (the embedded King James Bible, held out by whole books), `debian_docs`
    (the technical-prose corpus `moe-sweep build-corpus debian-docs` builds; each of its sources
    holds out its own validation set) or `files` (local .txt / .jsonl / .parquet files or globs in
    `paths`, held out by document hash)."""

    source: Literal["bible", "debian_docs", "files"] = "bible"
    paths: tuple[str, ...] = ()
    text_field: str = "text"  # JSONL field / Parquet column holding the text
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.01  # `files` only
    tokenizer: Literal["bpe", "gpt2", "bytes"] = "bpe"  # gpt2: GPT-2's own 50257-id BPE
    bpe_vocab_size: Annotated[int, Field(ge=260, le=65535)] = 4096
    cache_dir: str | None = None  # default: $MOE_SWEEP_CACHE or ~/.cache/moe-sweep

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source == "files" and not self.paths:
            raise ValueError("source 'files' needs at least one entry in paths")
        if self.source != "files" and self.paths:
            raise ValueError(f"paths is only used with source 'files', not '{self.source}'")
        return self
