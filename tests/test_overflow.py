"""Capacity overflow routed to a default expert (`moe.overflow: default_expert`): the pairs over an
expert's capacity are computed by one more expert per set instead of being dropped."""

from __future__ import annotations

import importlib.util
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from moe_core import ModelConfig, build_model
from moe_core.errors import ConfigError
from moe_core.moe.dispatch import capacity_ratio, dispatch_pairs, sort_by_expert, sort_with_overflow
from moe_core.moe.router import select_experts
from moe_core.sync_audit import SyncAudit
from tests.conftest import TINY, experts, layer_forward, tiny

HETERO_SHARED = {"experts": [experts(4, 1, "1/2"), experts(8, 2, "1/4")], "shared_experts": 1,
                 "shared_granularity": "1/4"}
VARIANTS = {
    "layerwise": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "capacity_factor": 0.5},
    "hetero_shared": {"layout": "layerwise", **HETERO_SHARED, "capacity_factor": 0.75},
    "unipool": {"layout": "unipool", "experts": [experts(16, 2, "1/2")], "router": {"scoring": "norm"},
                "balance": {"aux_weight": 0.0, "pool_weight": 0.01}, "capacity_factor": 0.5},
    "unipool_groups_renorm": {"layout": "unipool", "experts": [experts(8, 2, "1/2")], "pool_group_size": 2,
                              "router": {"renormalize": True}, "capacity_factor": 1.0},
}
BACKENDS = ["grouped", "streamed"] + (["triton"] if importlib.util.find_spec("triton") else [])


def _overflow(moe: dict, **model) -> ModelConfig:
    return tiny({**moe, "overflow": "default_expert"}, **model)


def _plain_overflow(ffn, x_TD, router, banks, cf: float) -> torch.Tensor:
    """The semantics, token by token: each set's pairs in slot-major order (first choices first,
    then earlier tokens); an expert takes the first C = ceil(CF * T * k / n) of them, the set's
    default expert (its last, id n) the rest; each pair adds gate * expert(x), plus the shared
    experts."""
    T = x_TD.shape[0]
    _, scores = router(x_TD)
    bias = ffn.bias_N if ffn.balance.bias_rate > 0 else None
    ids, gates = select_experts(scores, ffn.sets, bias, ffn.router_cfg.renormalize)
    rows = [ffn.shared(x_TD[t]) if ffn.shared is not None else torch.zeros_like(x_TD[t]) for t in range(T)]
    col = 0
    for s, bank in zip(ffn.sets, banks):
        cap = -(-Fraction(str(cf)) * T * s.top_k // s.num_experts)
        taken = [0] * s.num_experts
        for k in range(col, col + s.top_k):
            for t in range(T):
                e = int(ids[t, k]) - s.offset
                if taken[e] < cap:
                    taken[e] += 1
                else:
                    e = s.num_experts
                g, u = (x_TD[t] @ bank.w13_EDF2[e]).chunk(2)
                rows[t] = rows[t] + gates[t, k] * ((F.silu(g) * u) @ bank.w2_EFD[e])
        col += s.top_k
    return torch.stack(rows)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("name", ["layerwise", "hetero_shared", "unipool"])
def test_layer_equals_the_plain_token_loop(name, backend):
    """Output and the gradients of x, router and experts (the default ones included) of one layer
    against the token loop; CF < 1, so many pairs overflow."""
    moe = VARIANTS[name]
    model = build_model(_overflow({**moe, "backend": backend}))
    ffn = model.blocks[1].ffn
    router, pool = model.routers[ffn.router], model.pools[ffn.pool]
    params = [*router.parameters(), *pool.parameters(), *(ffn.shared.parameters() if ffn.shared else [])]
    x = torch.randn(2, 16, 32)
    results = []
    for fn in (lambda x_: ffn(x_).flatten(0, 1),
               lambda x_: _plain_overflow(ffn, x_.flatten(0, 1), router, pool.sets, moe["capacity_factor"])):
        x_in = x.clone().requires_grad_()
        y = fn(x_in)
        grads = torch.autograd.grad(y.square().sum(), [x_in, *params])
        results.append([y.detach(), *grads])
    assert layer_forward(ffn, x)[1].default_pairs > 0  # the default experts did take part
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"result {i}: {m}")


def _loss_and_grads(cfg: ModelConfig, backend: str, idx: torch.Tensor):
    torch.manual_seed(0)  # the same weights for every backend
    model = build_model(cfg.replace(moe=cfg.moe.replace(backend=backend)))
    out = model(idx[:, :-1], idx[:, 1:])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model.routing_stats()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", VARIANTS)
def test_backends_equal_the_reference_loss_and_every_gradient(name, backend):
    cfg = _overflow(VARIANTS[name])
    idx = torch.randint(0, 48, (3, 17))
    loss_r, grads_r, stats_r = _loss_and_grads(cfg, "reference", idx)
    loss_f, grads_f, stats_f = _loss_and_grads(cfg, backend, idx)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-6)
    for n, g in grads_r.items():
        assert g is not None, f"{n} got no gradient"
        torch.testing.assert_close(grads_f[n], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    for key in ("dropped_fraction", "default_fraction"):
        assert stats_f["summary"][key] == stats_r["summary"][key]


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_without_overflow_it_is_plain_dropping_and_the_default_expert_learns_nothing(backend):
    """CF so large nothing overflows: the same logits and gradients as `overflow: drop` with the
    same routed experts, and exactly zero gradient for each set's default expert."""
    moe = {"layout": "layerwise", **HETERO_SHARED, "capacity_factor": 8.0, "backend": backend}
    drop, default = build_model(tiny(moe)), build_model(_overflow(moe))
    state = drop.state_dict()
    for name, t in default.state_dict().items():
        if name.startswith("pools.") and ".sets." in name:  # the default expert (last) keeps its init
            state[name] = torch.cat([state[name], t[-1:]])
    default.load_state_dict(state)
    idx = torch.randint(0, 48, (3, 17))
    outs = []
    for model in (drop, default):
        out = model(idx[:, :-1], idx[:, 1:])
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].logits, outs[0].logits, rtol=0, atol=0)
    grads = dict(default.named_parameters())
    for name, p in drop.named_parameters():
        g = grads[name].grad
        if name.startswith("pools."):  # every pool parameter is an expert bank's
            assert not g[-1].any(), f"{name}: the default expert got a gradient"
            g = g[:-1]
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert default.routing_stats()["summary"]["default_fraction"] == 0.0


def test_overflow_is_relabelled_to_the_default_expert_and_grouped_last():
    """The hand-computed capacity example of test_moe_behaviour: C = 3, expert 0 keeps tokens 0,
    1, 2 (first choices), expert 1 tokens 3, 5 (first) and token 0's second choice; the other
    six pairs go to the default expert, id 2."""
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0], [0, 1], [1, 0]])
    with SyncAudit() as audit:
        d = sort_with_overflow(ids, 2, cap=3)
        ids_out = d.ids_TK
    assert not audit.ops, dict(audit.ops)
    assert ids_out.tolist() == [[0, 1], [0, 2], [0, 2], [1, 2], [2, 2], [1, 2]]
    assert d.offsets_E.tolist() == [3, 6, 12] and d.computed_G.tolist() == [3, 3, 6]
    # The router's view is unchanged: what it sent where, and what fitted.
    assert d.routed_E.tolist() == [6, 6] and d.kept_E.tolist() == [3, 3]
    assert int(d.default_rows) == 6 and int(d.num_dropped) == 0 and d.keep_P is None
    assert torch.equal(d.pair_gates(torch.ones(6, 2)), torch.ones(12))  # every pair keeps its gate
    # Each group lists its pairs in slot-major order, the default expert's too.
    groups = ids_out.t().reshape(-1)[d.pair_P]
    assert groups.tolist() == [0] * 3 + [1] * 3 + [2] * 6
    assert all(torch.all(d.pair_P[s:e].diff() > 0) for s, e in ((0, 3), (3, 6), (6, 12)))
    # The same pairs overflow as plain dropping drops.
    assert torch.equal(ids_out != 2, sort_by_expert(ids, 2, 3).keep_mask_TK())


def test_a_layers_dispatch_follows_its_capacity_rule():
    """The hand example above through `dispatch_pairs`, the layer's one call: CF 1 gives
    C = ceil(6 * 2 / 2) = 6 (nothing over it), CF 0.5 gives C = 3 (six pairs dropped, or six
    computed by the default expert), no CF keeps all 12 pairs."""
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0], [0, 1], [1, 0]])
    dropless = dispatch_pairs(ids, 2, None)
    assert dropless.keep_P is None and dropless.computed_G.tolist() == [6, 6]
    assert int(dispatch_pairs(ids, 2, capacity_ratio(1.0)).num_dropped) == 0
    dropped = dispatch_pairs(ids, 2, capacity_ratio(0.5))
    assert dropped.kept_E.tolist() == [3, 3] and int(dropped.num_dropped) == 6
    assert torch.equal(dropped.keep_mask_TK(), sort_by_expert(ids, 2, 3).keep_mask_TK())
    overflow = dispatch_pairs(ids, 2, capacity_ratio(0.5), overflow_to_default=True)
    assert overflow.computed_G.tolist() == [3, 3, 6] and int(overflow.num_dropped) == 0
    assert torch.equal(overflow.ids_TK, sort_with_overflow(ids, 2, cap=3).ids_TK)


def test_statistics_report_the_overflow_and_balance_counts_the_router_choices():
    """default_fraction is the share of pairs over capacity, dropped_fraction is zero; the loads,
    aux loss and z-loss are the router's, the same as with dropping (one layer: same inputs)."""
    moe = {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "capacity_factor": 0.5,
           "balance": {"aux_weight": 0.01, "z_weight": 0.001}}
    drop = build_model(tiny(moe, n_layers=1))
    default = build_model(_overflow(moe, n_layers=1))
    with torch.no_grad():
        for p_drop, p_default in zip(drop.parameters(), default.parameters()):
            p_drop.copy_(p_default[: p_drop.shape[0]] if p_default.shape != p_drop.shape else p_default)
    idx = torch.randint(0, 48, (2, 17))
    out_drop, out_default = drop(idx[:, :-1], idx[:, 1:]), default(idx[:, :-1], idx[:, 1:])
    s_drop, s_default = drop.routing_stats(), default.routing_stats()
    layer_drop, layer_default = s_drop["layers"][0], s_default["layers"][0]
    assert layer_default["tokens_per_expert"] == layer_drop["tokens_per_expert"]
    assert layer_default["dropped_fraction"] == 0.0 and layer_drop["default_fraction"] == 0.0
    assert layer_default["default_fraction"] == pytest.approx(layer_drop["dropped_fraction"])
    assert layer_default["default_fraction"] > 0
    assert s_default["summary"]["default_fraction"] == layer_default["default_fraction"]
    for term in ("aux", "z"):
        torch.testing.assert_close(out_default.balance[term], out_drop.balance[term], rtol=0, atol=0)


def test_the_default_expert_is_one_expert_per_set_per_pool():
    """Parameters held: one expert of each set's width more per pool (per layer in layerwise, per
    pool in UniPool); the router still scores only the routed experts."""
    for moe in ({"layout": "layerwise", **HETERO_SHARED, "capacity_factor": 1.0}, VARIANTS["unipool_groups_renorm"]):
        cfg = _overflow(moe)
        drop, default = build_model(tiny(moe)), build_model(cfg)
        extra = cfg.num_pools * sum(3 * cfg.d_model * cfg.expert_width(s.granularity) for s in cfg.moe.experts)
        held = [sum(p.numel() for p in m.parameters()) for m in (drop, default)]
        assert held[1] - held[0] == extra
        assert all(r.weight_ND.shape[0] == cfg.moe.num_routed_experts for r in default.routers)


def test_training_step_with_overflow_compiles_as_one_graph():
    model = build_model(_overflow({**VARIANTS["hetero_shared"], "backend": "grouped"}))
    ffn = model.blocks[1].ffn
    pool = model.pools[ffn.pool]
    compiled = torch.compile(ffn, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, 32)
    grads = []
    for fn in (compiled, ffn):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        y, routing = layer_forward(ffn, xi, fn)
        (y.square().sum() + routing.aux).backward()
        grads.append([y.detach(), xi.grad, *(p.grad for p in pool.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("moe, message", [
    ({"layout": "layerwise", "experts": [experts(4, 1)], "overflow": "default_expert"},
     "moe: overflow 'default_expert' needs capacity_factor: dropless routing never overflows"),
    ({"layout": "layerwise", "experts": [experts(4, 1)], "capacity_factor": 1.0, "overflow": "reroute"},
     "moe.overflow: Input should be 'drop' or 'default_expert'"),
])
def test_config_errors_are_one_line(moe, message):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**TINY, "moe": moe})
    assert isinstance(err.value, ValueError)
    assert str(err.value) == f"ModelConfig: {message}" and "\n" not in str(err.value)
