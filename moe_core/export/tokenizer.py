"""A trial's tokenizer as a transformers fast tokenizer (`tokenizer.json` + `tokenizer_config.json`).

moe_core documents end with `<|endoftext|>` and nothing marks their start, so that one token is
the export's eos, bos and pad (GPT-2's convention), and encoding adds no special tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moe_core.data.tokenizers import EOS, BPETokenizer, ByteTokenizer, Tokenizer
from moe_core.errors import ConfigError


def hf_tokenizer(tok: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """`tok` for transformers, encoding and decoding to the same ids and text."""
    if isinstance(tok, ByteTokenizer):
        backend = byte_backend()
    elif isinstance(tok, BPETokenizer):
        backend = tok.backend  # copied by PreTrainedTokenizerFast
    else:
        raise ConfigError(f"tokenizer '{tok.name}' has no Hugging Face export (bytes and BPE do)")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS, eos_token=EOS, pad_token=EOS,
        clean_up_tokenization_spaces=False, model_max_length=max_length,
    )


def byte_backend() -> Backend:
    """`ByteTokenizer` as a `tokenizers` object: byte b is id b and `<|endoftext|>` is 256.

    A BPE with no merges over the 256 byte symbols of byte-level pre-tokenisation (GPT-2's
    printable stand-ins, ordered so that symbol b stands for byte b): every byte of the UTF-8
    text becomes its own token, and the byte-level decoder turns ids back into the bytes and
    decodes them as UTF-8 (invalid sequences become U+FFFD, as `ByteTokenizer.decode` does).
    """
    vocab = {symbol: b for b, symbol in enumerate(byte_symbols())}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS])
    return backend


def byte_symbols() -> list[str]:
    """GPT-2's printable character for each byte 0-255 (`bytes_to_unicode`): printable Latin-1
    bytes stand for themselves, the others take code points 256, 257, ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    spare = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(spare)) for b in range(256)]
