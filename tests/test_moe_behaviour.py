"""Invariants of the MoE layer: dense equivalence, sharing, balancing, dropping, probe, stats."""

import io
import math

import numpy as np
import pytest
import torch

from moe_core import build_model
from moe_core.moe.dispatch import capacity, sort_by_expert
from moe_core.moe.router import load_fraction, norm_router_constant, select_experts, switch_loss
from moe_core.moe.stats import _jaccard, _unique_per_row
from tests.conftest import experts, layer_forward, tiny


def _batch(b=2, s=16):
    return torch.randint(0, 48, (b, s)), torch.randint(0, 48, (b, s))


def test_one_expert_top1_full_width_equals_dense_ffn_with_same_weights():
    dense = build_model(tiny())
    moe = build_model(tiny({"layout": "layerwise", "experts": [experts(1, 1)],
                            "balance": {"aux_weight": 0, "z_weight": 0}}))
    state = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    moe.load_state_dict(state, strict=False)
    with torch.no_grad():
        for block, pool in zip(dense.blocks, moe.pools):
            pool.sets[0].w13_EDF2[0].copy_(block.ffn.w13.weight.t())
            pool.sets[0].w2_EFD[0].copy_(block.ffn.w2.weight.t())
    idx, _ = _batch()
    torch.testing.assert_close(moe(idx).logits, dense(idx).logits, rtol=1e-5, atol=1e-6)


def test_unipool_layers_share_one_storage_and_sum_their_gradients():
    moe = {"layout": "unipool", "experts": [experts(8, 2, "1/2")]}
    shared = build_model(tiny(moe))
    per_layer = build_model(tiny({**moe, "pool_group_size": 1}))  # one pool per layer
    assert len(shared.pools) == 1 and len(per_layer.pools) == 4
    assert {b.ffn.pool for b in shared.blocks} == {0}
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("pools.")}
    per_layer.load_state_dict(state, strict=False)
    with torch.no_grad():
        for pool in per_layer.pools:
            for src, dst in zip(shared.pools[0].parameters(), pool.parameters()):
                dst.copy_(src)
    idx, targets = _batch()
    shared(idx, targets).loss.backward()
    per_layer(idx, targets).loss.backward()
    for i, w in enumerate(shared.pools[0].parameters()):
        summed = sum(list(pool.parameters())[i].grad for pool in per_layer.pools)
        torch.testing.assert_close(w.grad, summed, rtol=1e-5, atol=1e-7)
    # A saved shared pool stays one tensor: no per-layer copies in the checkpoint.
    assert sum(k.startswith("pools.") and k.endswith("w13_EDF2") for k in shared.state_dict()) == 1


def test_pathmoe_layers_of_a_block_use_one_router():
    moe = {"layout": "layerwise", "experts": [experts(4, 1)]}
    for block_size, n_routers in [(1, 4), (2, 2), (3, 2), (4, 1)]:
        model = build_model(tiny({**moe, "router": {"block_size": block_size}}))
        assert len(model.routers) == n_routers
        assert [b.ffn.router for b in model.blocks] == [i // block_size for i in range(4)]


def test_loss_free_bias_moves_against_load_and_leaves_gates_unchanged():
    model = build_model(tiny({"layout": "layerwise", "experts": [experts(4, 1)], "balance": {"bias_rate": 0.1}}))
    idx, targets = _batch()
    model(idx, targets)
    ffn = model.blocks[0].ffn
    load = ffn.step_counts_N.clone().float()
    model.finish_step()
    expected = 0.1 * torch.sign(load.mean() - load)
    torch.testing.assert_close(ffn.bias_N, expected)
    assert ffn.step_counts_N.sum() == 0

    # A big bias forces the choice of expert 2, but its gate is still the plain router score.
    with torch.no_grad():
        ffn.bias_N.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))
    h = torch.randn(5, 32)
    _, routing = layer_forward(ffn, h[None])  # the layer routes with its bias
    assert routing.ids_TK.flatten().tolist() == [2] * 5
    _, scores = model.routers[0](h)
    ids, gates = select_experts(scores, ffn.sets, ffn.bias_N, ffn.router_cfg.renormalize)
    assert ids.flatten().tolist() == [2] * 5
    torch.testing.assert_close(gates[:, 0], scores[:, 2])

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = build_model(model.cfg)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    torch.testing.assert_close(fresh.blocks[0].ffn.bias_N, ffn.bias_N)


def test_bias_receives_no_gradient():
    model = build_model(tiny({"layout": "layerwise", "experts": [experts(4, 2)], "balance": {"bias_rate": 0.1}}))
    assert "blocks.0.ffn.bias_N" not in dict(model.named_parameters())


def test_capacity_drops_exactly_the_hand_computed_pairs():
    # 6 tokens, top-2 of 2 experts; C = ceil(0.5 * 6 * 2 / 2) = 3 pairs per expert.
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0], [0, 1], [1, 0]])
    cap = capacity(0.5, num_tokens=6, top_k=2, num_experts=2)
    assert cap == 3
    d = sort_by_expert(ids, 2, cap)
    # Expert 0 serves first choices first, in token order: tokens 0, 1, 2 (slot 0); token 4's
    # first choice and tokens 3, 5's second choices overflow. Expert 1: tokens 3, 5 (slot 0),
    # then token 0's second choice; tokens 1, 2, 4's second choices overflow.
    expected = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 0], [0, 0], [1, 0]], dtype=torch.bool)
    assert torch.equal(d.keep_mask_TK(), expected)
    assert d.kept_E.tolist() == [3, 3] and d.routed_E.tolist() == [6, 6]
    assert int(d.num_dropped) == 6


def test_capacity_is_exact_for_decimal_factors():
    assert capacity(1.1, 100, 1, 1) == 110  # float arithmetic gives 110.00000000000001
    assert capacity(1.1, 100, 2, 4) == 55
    assert capacity(1.25, 10, 1, 4) == 4


def test_cpu_autocast_runs_the_fast_path_in_bfloat16():
    model = build_model(tiny({"layout": "layerwise", "experts": [experts(4, 2, "1/4")]}, d_ff=40))
    idx, targets = _batch()
    reference = model(idx, targets).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx, targets)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(reference, rel=0.05)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", ["float32", "compute"])
def test_router_logits_matmul_runs_in_the_configured_dtype_and_the_rest_in_float32(dtype):
    from moe_core.config import RouterConfig
    from moe_core.moe.parts import compute_dtype
    from moe_core.moe.router import Router

    router = Router(32, ((8, 2),), RouterConfig(dtype=dtype))
    torch.nn.init.normal_(router.weight_ND, std=0.3)
    x = torch.randn(10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, scores = router(x, compute_dtype(x))  # as the layer hands it the compute dtype
    assert logits.dtype == scores.dtype == torch.float32
    operands = torch.float32 if dtype == "float32" else torch.bfloat16
    expected = (x.to(operands) @ router.weight_ND.to(operands).t()).float()
    assert torch.equal(logits, expected)
    assert torch.equal(scores, expected.softmax(dim=-1))
    # Without autocast the compute dtype is x's: a float32 model routes the same either way.
    assert torch.equal(router(x)[0], x @ router.weight_ND.t())


def test_a_layer_hands_its_router_the_compute_dtype():
    """The layer takes the compute dtype once (autocast's, else x's) and gives it to the router,
    so `router.dtype: compute` logits use bfloat16 operands in a model under autocast."""
    model = build_model(tiny({"layout": "layerwise", "experts": [experts(4, 2)], "router": {"dtype": "compute"}}))
    seen = []
    model.routers[0].register_forward_hook(lambda mod, args, out: seen.append(args[1]))
    idx = torch.randint(0, model.cfg.vocab_size, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx)
    model(idx)
    assert seen == [torch.bfloat16, torch.float32]


def test_expert_sets_are_summed_in_the_residual_dtype_under_autocast():
    """Under bfloat16 autocast each set's experts compute in bfloat16; their outputs are summed
    in x's dtype (float32), as if added to a float32 zero tensor."""
    model = build_model(tiny({"layout": "layerwise", "experts": [experts(4, 1, "1/2"), experts(8, 2, "1/4")]}))
    ffn = model.blocks[0].ffn
    x = torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ffn(x)
    assert y.dtype == torch.float32


def test_the_fast_paths_backward_refuses_double_backward():
    model = build_model(tiny({"layout": "layerwise", "experts": [experts(4, 2, "1/2")]}))
    loss = model(*_batch()).loss
    grads = torch.autograd.grad(loss, list(model.pools[0].parameters()), create_graph=True)
    # A silently wrong second derivative is what once_differentiable prevents: it raises instead.
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grads[0].sum().backward()


def test_capacity_large_enough_equals_dropless():
    moe = {"layout": "layerwise", "experts": [experts(8, 2, "1/2")]}
    dropless = build_model(tiny(moe))
    roomy = build_model(tiny({**moe, "capacity_factor": 8.0}))
    roomy.load_state_dict(dropless.state_dict())
    idx, _ = _batch()
    torch.testing.assert_close(roomy(idx).logits, dropless(idx).logits)
    assert roomy.routing_stats()["summary"]["dropped_fraction"] == 0.0


def test_dropped_fraction_is_reported():
    model = build_model(tiny({"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "capacity_factor": 0.25}))
    model(_batch()[0])
    stats = model.routing_stats()
    for layer in stats["layers"]:
        kept = sum(min(c, capacity(0.25, 32, 2, 8)) for c in layer["tokens_per_expert"])
        assert layer["dropped_fraction"] == pytest.approx(1 - kept / 64)
    assert stats["summary"]["dropped_fraction"] > 0


def test_pool_loss_is_zero_first_then_uses_previous_micro_batch_loads():
    model = build_model(tiny({"layout": "unipool", "experts": [experts(8, 2, "1/2")],
                              "balance": {"aux_weight": 0, "z_weight": 0, "pool_weight": 1.0}}))
    sets = model.moe_layers[0].sets
    first = model(*_batch())
    assert float(first.balance["pool"].detach()) == 0.0
    f_prev = torch.stack([load_fraction(r.routed_N, r.num_tokens, sets) for r in model.last_routing]).mean(0)
    second = model(*_batch())
    p_now = torch.stack([r.mean_p_N for r in model.last_routing]).mean(0)
    expected = switch_loss(f_prev, p_now, sets)
    torch.testing.assert_close(second.balance["pool"], expected)
    assert float(expected) > 0


def test_grouped_pools_add_their_losses_each_at_the_full_weight():
    # G = 2 of 4 layers: two pools, each with its own previous-micro-batch loads; the official
    # code keeps one accumulator per group and sums them (not their mean).
    model = build_model(tiny({"layout": "unipool", "pool_group_size": 2, "experts": [experts(8, 2, "1/2")],
                              "balance": {"aux_weight": 0, "z_weight": 0, "pool_weight": 1.0}}))
    sets = model.moe_layers[0].sets
    model(*_batch())
    prev = {}
    for r in model.last_routing:
        prev.setdefault(r.pool, []).append(load_fraction(r.routed_N, r.num_tokens, sets))
    second = model(*_batch())
    per_pool = []
    for pool, f in prev.items():
        p_now = torch.stack([r.mean_p_N for r in model.last_routing if r.pool == pool]).mean(0)
        per_pool.append(switch_loss(torch.stack(f).mean(0), p_now, sets))
    assert len(per_pool) == 2
    torch.testing.assert_close(second.balance["pool"], per_pool[0] + per_pool[1])


def test_pool_loss_reaches_the_routers_through_scores_only():
    model = build_model(tiny({"layout": "unipool", "experts": [experts(8, 2, "1/2")],
                              "balance": {"aux_weight": 0, "z_weight": 0, "pool_weight": 1.0}}))
    model(*_batch())
    out = model(*_batch())
    out.balance["pool"].backward()
    assert model.routers[0].weight_ND.grad.abs().sum() > 0
    assert not model.pools[0].prev_load_N.requires_grad  # f-bar is a detached buffer


def test_global_batch_aux_uses_the_steps_accumulated_loads():
    model = build_model(tiny({"layout": "layerwise", "experts": [experts(8, 2, "1/2")],
                              "balance": {"aux_scope": "global_batch", "z_weight": 0}}))
    model(*_batch())
    model(*_batch())
    ffn = model.blocks[0].ffn
    rec = model.last_routing[0]
    f = load_fraction(ffn.step_counts_N, ffn.step_tokens, ffn.sets)
    torch.testing.assert_close(rec.aux, switch_loss(f, rec.mean_p_N, ffn.sets))
    assert int(ffn.step_tokens) == 64


@pytest.mark.parametrize("mode", ["eval", "no_grad_in_train_mode"])
def test_evaluation_does_not_accumulate_loads_or_update_pool_state(mode):
    model = build_model(tiny({"layout": "unipool", "experts": [experts(8, 2, "1/2")], "balance": {"pool_weight": 0.1}}))
    if mode == "eval":
        model.eval()
        model(*_batch())
    else:
        with torch.no_grad():
            model(*_batch())
    assert all(int(f.usage_N.sum()) == 0 and int(f.step_tokens) == 0 for f in model.moe_layers)
    assert float(model.pools[0].prev_load_N.sum()) == 0.0


def test_balanced_routing_gives_switch_loss_of_one():
    from moe_core.moe.router import SetSlice

    sets = (SetSlice(0, 4, 1), SetSlice(4, 2, 1))
    f = torch.tensor([0.25] * 4 + [0.5] * 2)
    assert float(switch_loss(f, f, sets)) == pytest.approx(1.0)


def _official_c(num_experts: int, top_k: int, samples: int) -> float:
    """UniPool's `_monte_carlo_y_k` as its official code describes it: one numpy draw at a time."""
    rng, out = np.random.RandomState(42), []
    for _ in range(samples):
        x = rng.randn(num_experts)
        y = np.maximum(0, x / np.linalg.norm(x))
        out.append(1.0 / np.sqrt((np.sort(y)[::-1][:top_k] ** 2).sum()))
    return float(np.mean(out))


@pytest.mark.parametrize("n,k,samples", [(16, 1, 3000), (32, 2, 3000), (96, 1, 100_000)])
def test_norm_router_constant_is_the_official_mean_of_reciprocals(n, k, samples):
    # The same numpy stream drawn in chunks: the official value to rounding (M = 96, top-1 is the
    # 182M recipe, all 100,000 draws), not 1 / E||y_k||, which is a few percent lower.
    assert norm_router_constant(((n, k),), samples=samples) == pytest.approx(_official_c(n, k, samples), rel=1e-12)
    z = torch.randn(samples, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inverse_mean = 1 / float(torch.relu(z / z.norm(dim=-1, keepdim=True)).topk(k).values.norm(dim=-1).mean())
    assert norm_router_constant(((n, k),), samples=samples) > inverse_mean * 1.01  # Jensen: E[1/X] > 1/E[X]


def test_norm_router_constant_of_several_sets_and_of_tiny_pools():
    # Two sets, each with its own top-k of the shared scores: c is E[1/||y_k||] of their union.
    rng = np.random.RandomState(42)
    x = rng.randn(4000, 64)
    y = np.maximum(0, x / np.linalg.norm(x, axis=1, keepdims=True))
    union = np.concatenate([np.sort(y[:, :48])[:, -3:], np.sort(y[:, 48:])[:, -1:]], axis=1)
    expected = float(np.mean(1 / np.sqrt((union**2).sum(axis=1))))
    assert norm_router_constant(((48, 3), (16, 1)), samples=4000) == pytest.approx(expected, rel=1e-12)
    # 4 experts: 1 draw in 16 is all negative (score 0 at any c); it is left out, not infinite.
    assert 1.0 < norm_router_constant(((4, 1),), samples=2000) < 4.0


def test_routing_probe_uses_random_experts_from_the_chosen_candidates():
    model = build_model(tiny({"layout": "layerwise", "experts": [experts(16, 2, "1/2")]}))
    model(*_batch(4))  # training forward: records usage for the top-8 candidates
    model.eval()
    idx, _ = _batch(4)
    with torch.no_grad():
        learned = model(idx).logits
        learned_ids = [r.ids_TK for r in model.last_routing]
        model.set_routing_probe([2], candidates="top8", seed=1)
        probed = model(idx).logits
    ids = model.last_routing[2].ids_TK
    top8 = set(model.blocks[2].ffn.usage_N.topk(8).indices.tolist())
    assert set(ids.flatten().tolist()) <= top8
    assert not torch.equal(ids, learned_ids[2])
    # Earlier layers are untouched by a probe on a later one.
    assert torch.equal(model.last_routing[1].ids_TK, learned_ids[1])
    assert not torch.allclose(probed, learned)
    model.set_routing_probe(None)
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, learned)
    model.train()
    model.set_routing_probe([2])
    with pytest.raises(RuntimeError, match="evaluation-time"):
        model(idx)


def test_routing_probe_rejects_dense_layers():
    from moe_core import ConfigError

    model = build_model(tiny({"layout": "layerwise", "experts": [experts(4, 1)], "moe_every": 2}))
    with pytest.raises(ConfigError, match=r"\[1\] are not MoE layers"):
        model.set_routing_probe([1])


def test_path_statistics():
    a = torch.tensor([[0, 1], [2, 3]])
    b = torch.tensor([[1, 0], [2, 5]])
    assert _jaccard(a, b) == pytest.approx((1.0 + 1 / 3) / 2)
    assert _unique_per_row(torch.tensor([[3, 1, 3, 1], [0, 1, 2, 3]])).tolist() == [2, 4]
    model = build_model(tiny({"layout": "unipool", "experts": [experts(8, 2, "1/2")], "router": {"block_size": 4}}))
    model(*_batch())
    stats = model.routing_stats(path_tokens=5)
    assert len(stats["paths"]["top1"]) == 5 and len(stats["paths"]["top1"][0]) == 4
    assert len(stats["paths"]["jaccard"]) == 3
    pool = stats["pools"][0]
    assert pool["layers"] == [0, 1, 2, 3]
    assert 2 <= pool["unique_experts_per_token"] <= 8
    for layer in stats["layers"]:
        assert sum(layer["tokens_per_expert"]) == 64
        assert layer["max_load"] >= 1.0
        assert 0 < layer["entropy"] <= math.log(8) + 1e-6


def test_silent_fraction_counts_tokens_whose_chosen_norm_scores_are_all_zero():
    """NormRouter's ReLU can zero every score of a token (all normalised logits <= 0): its gates
    are 0, the layer adds nothing and the router learns nothing from it. With every router row
    the same vector w, a token is silent exactly when w . h < 0, which the statistic must count."""
    cfg = tiny({"layout": "unipool", "experts": [experts(8, 2)], "router": {"scoring": "norm", "renormalize": False}})
    model = build_model(cfg).eval()
    seen = {}
    for i, router in enumerate(model.routers):
        w = torch.randn(cfg.d_model)
        with torch.no_grad():
            router.weight_ND.copy_(w.expand_as(router.weight_ND))
        router.register_forward_hook(lambda m, args, out, i=i, w=w: seen.setdefault(i, []).append(
            float((args[0].float() @ w <= 0).float().mean())))
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (4, 16)))
    layers = model.routing_stats()["layers"]
    expected = [seen[f.router].pop(0) for f in model.moe_layers]  # each router's calls, in layer order
    assert [x["silent_fraction"] for x in layers] == pytest.approx(expected)
    assert 0 < model.routing_stats()["summary"]["silent_fraction"] < 1
    softmax = build_model(tiny({"layout": "layerwise", "experts": [experts(8, 2)]})).eval()
    with torch.no_grad():
        softmax(torch.randint(0, cfg.vocab_size, (4, 16)))
    assert softmax.routing_stats()["summary"]["silent_fraction"] == 0.0  # softmax scores are never 0
