"""Learning-rate schedules as a multiplier of the peak lr, a pure function of the step."""

from __future__ import annotations

import math

from moe_core.train.config import TrainConfig


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup from 0, then cosine to `min_lr_ratio`, WSD (flat, then linear decay over the
    last `decay_fraction` of steps) or constant.

    The warm-up is Megatron's (UniPool's recipe): step i of w runs at i / w of the peak, so the
    first step runs at lr 0 and step w at the peak; any `warmup_fraction` > 0 warms up at least
    one step (1% of 20 steps would round to none and start short trials at full lr)."""
    warmup = max(1, round(cfg.warmup_fraction * total_steps)) if cfg.warmup_fraction > 0 else 0
    if step < warmup:
        return step / warmup
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
