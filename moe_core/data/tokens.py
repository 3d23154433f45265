"""The token cache: a corpus tokenised once into memory-mapped arrays plus a manifest.

Layout: `<cache>/tokens/<key>/{train.bin, <valset>.bin, manifest.json}` where `key` hashes the
corpus fingerprint and the tokenizer. Concurrent trials of a sweep may ask for the same cache at
once: the first takes a file lock and builds into a temporary folder that it renames into place
(atomic), the others wait on the lock and then read the finished cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from moe_core.data.cache import cache_root
from moe_core.data.config import DataConfig
from moe_core.data.corpora import documents, fingerprint
from moe_core.data.tokenizers import ByteTokenizer, Tokenizer, bpe_tokenizer, gpt2_tokenizer
from moe_core.files import atomic_dir

FORMAT_VERSION = 1
BATCH_DOCS = 256


@dataclass
class TokenData:
    train: np.ndarray  # 1-D memmap of token ids
    val: dict[str, np.ndarray]  # validation set name -> 1-D memmap
    tokenizer: Tokenizer
    manifest: dict

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def trial_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer trials of `cfg` train with (a BPE comes from the cache, trained there first
    if it is missing): what evaluation and export of a finished trial must use too."""
    return _tokenizer(cfg, fingerprint(cfg), cache_root(cfg))


def _tokenizer(cfg: DataConfig, fp: str, root: Path) -> Tokenizer:
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer == "gpt2":
        return gpt2_tokenizer()
    train_texts = (text for split, text in documents(cfg) if split == "train")
    return bpe_tokenizer(train_texts, cfg.bpe_vocab_size, fp, root)


# Told the tokens written so far while a cache is built (a front end shows progress with it).
Progress = Callable[[int], None]


def _build(cfg: DataConfig, tok: Tokenizer, fp: str, final: Path, progress: Progress | None) -> None:
    with atomic_dir(final) as tmp:
        _write_cache(cfg, tok, fp, tmp, progress)


def _write_cache(cfg: DataConfig, tok: Tokenizer, fp: str, tmp: Path, progress: Progress | None) -> None:
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    files, counts, docs = {}, {}, {}

    def flush(batch: list[tuple[str, str]]) -> None:
        for (split, _), ids in zip(batch, tok.encode_batch([t for _, t in batch])):
            if split not in files:
                files[split] = (tmp / f"{split}.bin").open("wb")
                counts[split], docs[split] = 0, 0
            arr = np.asarray(ids + [tok.eos_id], dtype=dtype)
            files[split].write(arr.tobytes())
            counts[split] += arr.size
            docs[split] += 1

    batch: list[tuple[str, str]] = []
    for doc in documents(cfg):
        batch.append(doc)
        if len(batch) == BATCH_DOCS:
            flush(batch)
            batch = []
            if progress:
                progress(sum(counts.values()))
    flush(batch)
    for f in files.values():
        f.close()
    if "train" not in counts or len(counts) < 2:
        raise ValueError(f"corpus gave splits {sorted(counts)}: it needs training text and a held-out set")
    manifest = {
        "format": FORMAT_VERSION, "fingerprint": fp, "source": cfg.source, "tokenizer": tok.name,
        "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name, "tokens": counts, "documents": docs,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def prepare_tokens(cfg: DataConfig, progress: Progress | None = None) -> TokenData:
    """Tokenise the corpus into the cache if it is not there yet (telling `progress` the tokens
    written so far), then memory-map it."""
    root = cache_root(cfg)
    fp = fingerprint(cfg)
    tok = _tokenizer(cfg, fp, root)
    key = hashlib.sha256(f"{FORMAT_VERSION}|{fp}|{tok.name}".encode()).hexdigest()[:16]
    final = root / "tokens" / key
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if not (final / "manifest.json").exists():
            _build(cfg, tok, fp, final, progress)
    manifest = json.loads((final / "manifest.json").read_text())
    maps = {split: np.memmap(final / f"{split}.bin", dtype=manifest["dtype"], mode="r") for split in manifest["tokens"]}
    train = maps.pop("train")
    return TokenData(train=train, val=dict(sorted(maps.items())), tokenizer=tok, manifest=manifest)
