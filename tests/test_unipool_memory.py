"""Under autocast a UniPool pool is cast to the compute dtype once per forward, so autograd keeps
one low-precision copy of it for backward however many layers share it (issue 12, part 4).

Memory is measured as the bytes of the tensors autograd saves in a forward (saved-tensor hooks,
deduplicated by storage, parameters left out): what stays alive until backward."""

from __future__ import annotations

import pytest
import torch

from moe_core import build_model
from moe_core.moe.experts import ExpertWeights
from moe_core.moe.parts import PoolCast
from tests.conftest import experts, tiny

# A pool far larger than one layer's activations, so that a copy per layer cannot hide.
WIDE = dict(d_model=64, d_ff=128)
UNIPOOL = {"layout": "unipool", "experts": [experts(64, 2, "1/2")]}
VANILLA = {"layout": "layerwise", "experts": [experts(64, 2, "1/2")]}


def _saved_bytes(model, idx: torch.Tensor) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx[:, :-1], idx[:, 1:])
    return sum(saved.values())


def _growth(moe: dict, layers: int) -> int:
    """Saved bytes of a 2L-layer model minus those of an L-layer one."""
    idx = torch.randint(0, 48, (2, 17), generator=torch.Generator().manual_seed(0))
    return _saved_bytes(build_model(tiny(moe, n_layers=2 * layers, **WIDE)), idx) - _saved_bytes(
        build_model(tiny(moe, n_layers=layers, **WIDE)), idx)


def _pool_copy_bytes(moe: dict) -> int:
    """One bfloat16 copy of one pool's expert weights."""
    pool = build_model(tiny(moe, n_layers=1, **WIDE)).pools[0]
    return 2 * sum(p.numel() for p in pool.sets.parameters())


def _cast_in_every_layer(monkeypatch) -> None:
    """The behaviour before: each layer casts its own copy of the bank."""
    monkeypatch.setattr(PoolCast, "use", lambda self: ExpertWeights(
        self.bank.w13_EDF2.to(self.dtype), self.bank.w2_EFD.to(self.dtype)))


def test_more_unipool_layers_add_activations_not_pool_copies(monkeypatch):
    layers, copy = 2, _pool_copy_bytes(UNIPOOL)
    unipool, vanilla = _growth(UNIPOOL, layers), _growth(VANILLA, layers)
    # Each extra vanilla layer holds its own pool, saved once; beyond that the two models save
    # the same per-layer activations. So UniPool grows by the activations alone.
    assert abs(unipool - (vanilla - layers * copy)) <= copy // 100, (unipool, vanilla, copy)
    assert unipool < copy / 4  # far less than one pool copy for all the extra layers together

    _cast_in_every_layer(monkeypatch)  # the test sees the problem it guards against
    assert _growth(UNIPOOL, layers) >= unipool + layers * copy


def test_the_one_copy_is_what_is_saved():
    """The saved bytes do count the pool: at least one copy of it, and less than two."""
    idx = torch.randint(0, 48, (2, 17))
    copy = _pool_copy_bytes(UNIPOOL)
    saved = _saved_bytes(build_model(tiny(UNIPOOL, n_layers=4, **WIDE)), idx)
    assert copy <= saved < 2 * copy


def _loss_logits_grads(model, idx, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(idx[:, :-1], idx[:, 1:])
    out.loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}  # compiled too
    return out.loss.detach(), out.logits.detach().float(), grads


@pytest.mark.parametrize("moe", [UNIPOOL, {**UNIPOOL, "pool_group_size": 2, "capacity_factor": 1.0},
                                 {**VANILLA, "router": {"block_size": 2}}], ids=["unipool", "groups_cf", "vanilla"])
def test_outputs_and_gradients_are_unchanged(moe, monkeypatch):
    """Bit for bit what casting in every layer gave (each layer's gradient still reaches the
    float32 weight in float32), and close to float32: the loss, and the direction of the experts'
    gradients (a bfloat16 rounding may flip a near-tied top-k choice, which moves a fine-grained
    expert's gradient by a whole token's share: 10% of the norm here, so no elementwise bound)."""
    model = build_model(tiny(moe, **WIDE))
    idx = torch.randint(0, 48, (3, 17))
    loss, logits, grads = _loss_logits_grads(model, idx, autocast=True)
    assert logits.dtype == torch.float32 and model.pools[0].sets[0].w13_EDF2.grad.dtype == torch.float32

    with monkeypatch.context() as m:
        _cast_in_every_layer(m)
        before = _loss_logits_grads(model, idx, autocast=True)
    torch.testing.assert_close(logits, before[1], rtol=0, atol=0)
    for name, g in before[2].items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=lambda msg: f"{name}: {msg}")

    loss32, _, grads32 = _loss_logits_grads(model, idx, autocast=False)
    assert loss.item() == pytest.approx(loss32.item(), rel=1e-2)
    for name, g in grads32.items():
        if name.startswith("pools."):
            cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(), g.flatten(), dim=0)
            assert cosine > 0.98, f"{name}: cosine {cosine:.4f} between the bfloat16 and float32 gradients"


@pytest.mark.slow
def test_autocast_unipool_compiles_as_one_graph():
    """The per-use node of the shared cast traces with the rest of the model."""
    model = build_model(tiny({**UNIPOOL, "capacity_factor": 1.0}, **WIDE))
    idx = torch.randint(0, 48, (2, 17))
    eager = _loss_logits_grads(model, idx, autocast=True)
    compiled = _loss_logits_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), idx, autocast=True)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-3, atol=1e-3)
    for name, g in eager[2].items():
        torch.testing.assert_close(compiled[2][name], g, rtol=2e-2, atol=1e-3, msg=lambda msg: f"{name}: {msg}")


def test_a_checkpointed_backward_casts_each_pool_once_and_reports_nothing(monkeypatch):
    """Activation checkpointing recomputes the blocks in the backward, last first: their layers
    cast the pool again, once for all of them (`MoEParts.weights`), and their routing records are
    not the forward's: the model keeps the forward's records only. A grouped pool (2 layers each)
    is cast once per pool in the forward and once per pool in the backward."""
    model = build_model(tiny({**UNIPOOL, "pool_group_size": 2}, n_layers=4, **WIDE))
    model.set_activation_checkpointing(True)
    casts: list[int] = []
    real = PoolCast.__init__

    def counting(self, bank, dtype):
        casts.append(id(bank))
        real(self, bank, dtype)

    monkeypatch.setattr(PoolCast, "__init__", counting)
    idx = torch.randint(0, 48, (2, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx[:, :-1], idx[:, 1:])
    banks = [id(b) for pool in model.pools for b in pool.sets]
    assert len(banks) == 2 and sorted(casts) == sorted(banks)
    forward_records = [(r.layer, r.pool) for r in model.last_routing]
    assert forward_records == [(0, 0), (1, 0), (2, 1), (3, 1)]
    casts.clear()
    out.loss.backward()
    assert sorted(casts) == sorted(banks)  # the recomputation: one cast per pool, not per layer
    assert [(r.layer, r.pool) for r in model.last_routing] == forward_records
    assert not model.parts._casts  # nothing kept past the pool's first layer
    assert all(p.grad is not None for pool in model.pools for p in pool.parameters())
