"""A learnable synthetic sequence task, for smoke tests and the demo (no corpus needed).

Each sequence starts with two random tokens; every later token is x[t] = (a * x[t-2] + 1) mod V.
Predicting it needs the token two positions back, so a model must use attention as well as its
FFNs to learn the map. Only the second input token is unpredictable as a target, which puts the
loss floor at ln(V) / seq_len.
"""

from __future__ import annotations

import math

import torch

from moe_core.model import MoETransformer


def sequence_batch(vocab_size: int, batch: int, seq_len: int, gen: torch.Generator, a: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (batch, seq_len), targets shifted by one position."""
    x = torch.empty(batch, seq_len + 1, dtype=torch.long)
    x[:, :2] = torch.randint(0, vocab_size, (batch, 2), generator=gen)
    for t in range(2, seq_len + 1):
        x[:, t] = (a * x[:, t - 2] + 1) % vocab_size
    return x[:, :-1], x[:, 1:]


def loss_floor(vocab_size: int, seq_len: int) -> float:
    """Mean cross-entropy of a perfect predictor: one unpredictable target per sequence."""
    return math.log(vocab_size) / seq_len


def train_on_sequences(
    model: MoETransformer, steps: int, batch: int = 16, lr: float = 3e-3, seed: int = 0
) -> list[float]:
    """Plain AdamW loop on the synthetic task; returns the cross-entropy of every step."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        idx, targets = sequence_batch(cfg.vocab_size, batch, cfg.seq_len, gen)
        out = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        model.finish_step()
        losses.append(float(out.ce.detach()))
    return losses
