"""Learning-rate schedules as a multiplier of the peak lr, a pure function of the step."""

from __future__ import annotations

import math

from moe_core.train.config import TrainConfig


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to `min_lr_ratio`, WSD (flat, then linear decay over the last
    `decay_fraction` of steps) or constant."""
    warmup = round(cfg.warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - 1 - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)
