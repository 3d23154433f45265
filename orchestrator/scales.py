"""Named model scales: the dimensions a sweep gets from `scale: NAME` instead of spelling them out.

A scale fixes the dense model (vocabulary, width, depth, heads, dense FFN width d_ff, sequence
length, RoPE base, init); the MoE part comes from the sweep's study knobs, which keep every trial
FLOP-matched to that dense model. Keys given under `model:` in a sweep override the scale's.

Three families:
- `micro-*`: train in minutes on a 2-core CPU (BPE-4096 vocabulary of the built-in corpus).
- `study-*`: the design study's GPU ladder, about 20M to 1B non-embedding active parameters
  (GPT-2 vocabulary padded to 50304, sequence 1024, LLaMA-style as in UniPool's family).
  At S = 128 the small scales reach the study's 6.6B total parameters.
- `unipool-*`: UniPool's five published scales exactly (arXiv 2605.06665, table in methods.md);
  `pathmoe-0.9b`: PathMoE's 0.9B setting (24 layers, 16 experts, top-4). Its widths are not
  published: we take d = 1024 and a dense d_ff of 2560, so 16 experts of g = 1/4 (width 640)
  with top-4 give about 0.92B total parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Scale:
    name: str
    description: str
    model: dict[str, Any]  # ModelConfig keys (no `moe`)
    notes: str = field(default="")


def _micro(d: int, layers: int, heads: int, kv: int, d_ff: int) -> dict[str, Any]:
    return dict(vocab_size=4096, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, d_ff=d_ff, seq_len=256)


def _llama(d: int, layers: int, heads: int, kv: int = 4, vocab: int = 50304, d_ff: int | None = None) -> dict[str, Any]:
    return dict(
        vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, d_ff=d_ff or 4 * d,
        seq_len=1024, rope_base=1.0e6, init_std=0.01, tie_embeddings=False,
    )


# UniPool pads GPT-2's 50,257 ids to a multiple of 1,024 (its recipe); with the padding our
# totals equal the published ones to 0.02% (777.90M at 182M), without it they are 0.19% short.
UNIPOOL_VOCAB = 51200

_SCALES = [
    Scale("micro-xs", "2 layers, d 64: seconds per trial, for tests and smoke runs", _micro(64, 2, 2, 1, 256)),
    Scale("micro-s", "4 layers, d 128: a couple of minutes per trial on 2 CPUs", _micro(128, 4, 4, 2, 512)),
    Scale("micro-m", "6 layers, d 192", _micro(192, 6, 6, 2, 768)),
    Scale("micro-l", "8 layers, d 256", _micro(256, 8, 4, 2, 1024)),
    Scale("study-20m", "about 20M non-embedding active", _llama(384, 10, 6, kv=2)),
    Scale("study-50m", "about 45M non-embedding active", _llama(512, 12, 8)),
    Scale("study-100m", "about 100M non-embedding active", _llama(768, 12, 12)),
    Scale("study-200m", "about 235M non-embedding active", _llama(1024, 16, 16)),
    Scale("study-500m", "about 550M non-embedding active", _llama(1280, 24, 20)),
    Scale("study-1b", "about 1.05B non-embedding active", _llama(1536, 32, 16)),
    Scale("unipool-182m", "UniPool 182M: 12 layers, d 768, 12 heads", _llama(768, 12, 12, vocab=UNIPOOL_VOCAB)),
    Scale("unipool-469m", "UniPool 469M: 24 layers, d 1024, 16 heads", _llama(1024, 24, 16, vocab=UNIPOOL_VOCAB)),
    Scale("unipool-650m", "UniPool 650M: 36 layers, d 1024, 16 heads", _llama(1024, 36, 16, vocab=UNIPOOL_VOCAB)),
    Scale("unipool-830m", "UniPool 830M: 48 layers, d 1024, 16 heads", _llama(1024, 48, 16, vocab=UNIPOOL_VOCAB)),
    Scale("unipool-978m", "UniPool 978M: 24 layers, d 1536, 16 heads", _llama(1536, 24, 16, vocab=UNIPOOL_VOCAB)),
    Scale(
        "pathmoe-0.9b", "PathMoE 0.9B: 24 layers, d 1024; 16 experts top-4 at S = 4, g = 1/4",
        _llama(1024, 24, 16, vocab=50257, d_ff=2560), notes="widths chosen by us (unpublished)",
    ),
]

SCALES: dict[str, Scale] = {s.name: s for s in _SCALES}
