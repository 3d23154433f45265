"""Batches drawn from the token cache as a pure function of (seed, step): resuming needs no data
state, and any number of data-parallel workers sees the same global batch as one worker."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    block = torch.from_numpy(rows)
    return block[:, :-1], block[:, 1:]


def step_starts(num_tokens: int, seq_len: int, sequences: int, seed: int, step: int) -> np.ndarray:
    """Start offsets of every training sequence of one optimizer step (all workers)."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, num_tokens - seq_len - 1, size=sequences)


def micro_batches(
    tokens: np.ndarray, seq_len: int, micro_batch_size: int, accumulation: int, seed: int, step: int,
    rank: int = 0, world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This worker's micro-batches of `step`. Worker r takes the r-th contiguous block of the
    step's sequences, so W workers' micro-batches are exactly one worker's, dealt out: the same
    tokens in the same groups, hence the same routing."""
    per_worker = micro_batch_size * accumulation
    starts = step_starts(len(tokens), seq_len, per_worker * world_size, seed, step)
    mine = starts[rank * per_worker : (rank + 1) * per_worker]
    for m in range(accumulation):
        yield _windows(tokens, mine[m * micro_batch_size : (m + 1) * micro_batch_size], seq_len)


def eval_batches(tokens: np.ndarray, seq_len: int, max_tokens: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping windows from the start of a validation set (the same every eval)."""
    n = min(max_tokens, len(tokens) - 1) // seq_len
    starts = np.arange(n) * seq_len
    for i in range(0, n, batch):
        yield _windows(tokens, starts[i : i + batch], seq_len)
