"""A tiny model learns the synthetic sequence task, for each architecture family."""

import pytest
import torch

from moe_core import build_model
from moe_core.synthetic import sequence_batch, train_on_sequences
from tests.conftest import experts, tiny

FAMILIES = {
    "dense": {},
    "vanilla": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")]},
    "unipool": {"layout": "unipool", "experts": [experts(16, 2, "1/2")], "router": {"scoring": "norm"},
                "balance": {"aux_weight": 0.0, "pool_weight": 0.01}},
    "pathmoe": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "router": {"block_size": 2},
                "balance": {"aux_weight": 0.0}},
}


def test_sequence_task_follows_its_recurrence():
    idx, targets = sequence_batch(32, 4, 10, torch.Generator().manual_seed(0))
    assert torch.equal(idx[:, 1:], targets[:, :-1])
    assert torch.equal(targets[:, 1:], (5 * idx[:, :-1] + 1) % 32)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_falls_well_below_its_start(family):
    model = build_model(tiny(FAMILIES[family], vocab_size=32, n_layers=2))
    losses = train_on_sequences(model, steps=300, batch=16, lr=3e-3)
    start, end = losses[0], sum(losses[-20:]) / 20
    assert start > 3.0  # about ln(32) = 3.47 at initialisation
    # The floor is ln(32) / 16 = 0.22; a model that ignores context stays near ln(32) = 3.47.
    assert end < 0.25 * start, f"{family}: {start:.3f} -> {end:.3f}"
