"""The fast (grouped) expert path equals the reference loop: outputs and every gradient."""

import pytest
import torch

from moe_core import build_model
from tests.conftest import experts, tiny

HETERO = [experts(6, 2, "1/4"), experts(3, 1, "1/2")]

VARIANTS = {
    "layerwise": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")]},
    "layerwise_k3_uneven": {"layout": "layerwise", "experts": [experts(7, 3, "1/3")]},
    "unipool_G1": {"layout": "unipool", "experts": [experts(8, 2, "1/2")], "pool_group_size": 1},
    "unipool_G2": {"layout": "unipool", "experts": [experts(8, 2, "1/2")], "pool_group_size": 2},
    "unipool_all": {"layout": "unipool", "experts": [experts(16, 1)], "router": {"scoring": "norm"},
                    "balance": {"aux_weight": 0.0, "pool_weight": 0.02}},
    "shared": {"layout": "layerwise", "experts": [experts(8, 2, "1/4")], "shared_experts": 2, "shared_granularity": "1/4"},
    "hetero": {"layout": "layerwise", "experts": HETERO},
    "hetero_unipool": {"layout": "unipool", "experts": HETERO, "pool_group_size": 2},
    "sigmoid_renorm": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "router": {"scoring": "sigmoid", "renormalize": True}},
    "softmax_renorm": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "router": {"renormalize": True}},
    "norm": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "router": {"scoring": "norm"}},
    "pathmoe_B1": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "router": {"block_size": 1}},
    "pathmoe_B2": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "router": {"block_size": 2}},
    "pathmoe_BL": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "router": {"block_size": 4}},
    "capacity_1.0": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "capacity_factor": 1.0},
    "capacity_0.5": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "capacity_factor": 0.5},
    "capacity_hetero_unipool": {"layout": "unipool", "experts": HETERO, "capacity_factor": 0.75},
    "global_aux_bias": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")],
                        "balance": {"aux_scope": "global_batch", "bias_rate": 0.01}},
    "every_other_layer": {"layout": "layerwise", "experts": [experts(4, 1)], "moe_every": 2, "first_dense_layers": 1},
}


def _run(model, idx, targets):
    out = model(idx, targets)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["streamed", "grouped"])
@pytest.mark.parametrize("name", VARIANTS)
def test_fast_paths_equal_reference_outputs_and_gradients(name, backend):
    """`streamed` is the CPU path; `grouped` is the GPU path (and the compiled one), run here on CPU."""
    moe = VARIANTS[name]
    ref = build_model(tiny({**moe, "backend": "reference"}))
    fast = build_model(tiny({**moe, "backend": backend}))
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 48, (3, 16))
    targets = torch.randint(0, 48, (3, 16))
    out_r, grads_r = _run(ref, idx, targets)
    out_f, grads_f = _run(fast, idx, targets)
    torch.testing.assert_close(out_f.logits, out_r.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_f.loss, out_r.loss, rtol=1e-5, atol=1e-6)
    for n, g in grads_r.items():
        assert g is not None, f"{n} got no gradient"
        torch.testing.assert_close(grads_f[n], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("path", ["streamed_one_chunk", "streamed_chunk_per_expert", "gathered"])
def test_awkward_routings_match_reference(path, monkeypatch):
    """Empty experts, one expert taking every token, k > 1 and uneven counts, straight through
    the expert computation, for the CPU streamed path (with one and with many chunks) and the
    gather-then-grouped-GEMM path used off CPU."""
    from moe_core.moe import streamed
    from moe_core.moe.dispatch import sort_by_expert
    from moe_core.moe.experts import ExpertBank, experts_cpu_streamed, experts_grouped, experts_reference

    if path == "streamed_chunk_per_expert":
        monkeypatch.setattr(streamed, "CHUNK_BYTES", 1)
    # d = 16, F = 8: rows are 16-byte aligned, so torch._grouped_mm takes part where it exists.
    bank = ExpertBank(5, 16, 8)
    if path != "gathered":
        # Garbage in fresh allocations must never reach a gradient: poison torch.empty_like.
        real_full_like, real_new_full = torch.full_like, torch.Tensor.new_full
        monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real_full_like(
            t, float("nan") if (kw.get("dtype") or t.dtype).is_floating_point else -1, **kw))
        # The streamed path's reused row buffers come from `new_empty`.
        monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *size, **kw: real_new_full(
            t, size[0] if len(size) == 1 and not isinstance(size[0], int) else size,
            float("nan") if (kw.get("dtype") or t.dtype).is_floating_point else -1, **kw))
    torch.nn.init.normal_(bank.w13_EDF2)
    torch.nn.init.normal_(bank.w2_EFD)
    x = torch.randn(9, 16, requires_grad=True)
    two_of_five = torch.tensor([[0, 1], [1, 0], [0, 4], [4, 1], [1, 0], [0, 1], [4, 0], [1, 4], [0, 1]])
    cases = {  # name: (ids, capacity)
        "all_to_one": (torch.full((9, 1), 3), None),
        "two_of_five_empty": (two_of_five, None),
        "k3": (torch.stack([torch.randperm(5)[:3] for _ in range(9)]), None),
        "capacity_3": (two_of_five, 3),
    }
    for name, (ids, cap) in cases.items():
        gates = torch.rand(ids.shape, requires_grad=True)
        dispatch = sort_by_expert(ids, 5, cap)
        outs = []
        for fn in ("ref", "fast"):
            for t in (x, gates, bank.w13_EDF2, bank.w2_EFD):
                t.grad = None
            run = experts_reference if fn == "ref" else experts_grouped if path == "gathered" else experts_cpu_streamed
            y = run(bank, x, dispatch, gates)
            y.pow(2).sum().backward()
            outs.append([y.detach()] + [t.grad.clone() for t in (x, gates, bank.w13_EDF2, bank.w2_EFD)])
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_streamed_path_is_bitwise_deterministic(monkeypatch):
    from moe_core.moe import streamed

    monkeypatch.setattr(streamed, "CHUNK_BYTES", 256)
    model = build_model(tiny({"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "backend": "streamed"}))
    idx, targets = torch.randint(0, 48, (4, 16)), torch.randint(0, 48, (4, 16))
    runs = []
    for _ in range(2):
        model.zero_grad()
        out = model(idx, targets)
        out.loss.backward()
        runs.append([out.logits.detach()] + [p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_chunks_hold_whole_experts_and_cover_every_row():
    from moe_core.moe.streamed import plan_chunks

    assert plan_chunks([3, 0, 5, 1, 0, 0, 4], rows_per_chunk=4) == [(0, 3, 0, 8), (3, 7, 8, 13)]
    # Trailing experts without rows still belong to a chunk: their weight gradients are written.
    assert plan_chunks([4, 1, 0, 0], rows_per_chunk=4) == [(0, 1, 0, 4), (1, 4, 4, 5)]
    assert plan_chunks([0, 0], 4) == [(0, 2, 0, 0)]


def test_grouped_mm_equals_the_per_group_loop():
    from moe_core.moe import grouped_gemm

    a, b = torch.randn(20, 16), torch.randn(4, 16, 8)
    counts = [5, 0, 12, 3]
    fast = grouped_gemm.grouped_matmul(a, b, grouped_gemm.offsets_from_counts(counts))
    assert grouped_gemm.grouped_mm_usable(a, b) == hasattr(torch, "_grouped_mm")
    loop = torch.cat([a[s:s + c] @ b[e] for e, (s, c) in enumerate(zip([0, 5, 5, 17], counts))])
    torch.testing.assert_close(fast, loop)


def test_streamed_swiglu_backward_holds_in_bfloat16_for_large_preactivations():
    """silu' must stay 1 for large z in bfloat16 (a cancelling form of it gave 0 or 2)."""
    from moe_core.moe.streamed import _swiglu_backward

    z = torch.tensor([-300.0, -20.0, -1.0, 0.0, 0.5, 3.0, 7.0, 40.0, 258.0, 260.0, 1000.0])
    n = z.numel()
    u, g, d_act = torch.linspace(-2, 2, n), torch.linspace(0.1, 1.0, n), torch.linspace(1, -1, n)
    ref = [t.double().requires_grad_() for t in (z, u, g)]
    (torch.nn.functional.silu(ref[0]) * ref[1] * ref[2]).backward(d_act.double())
    h = torch.stack([z, u], dim=1).bfloat16()
    dgates = torch.empty(n, dtype=torch.bfloat16)
    dh, act_g = _swiglu_backward(h, d_act.bfloat16()[:, None].clone(), g.bfloat16()[:, None], dgates)
    close = {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(dh[:, 0].double(), ref[0].grad, **close)
    torch.testing.assert_close(dh[:, 1].double(), ref[1].grad, **close)
    scale = ref[2].grad.abs().clamp(min=1)  # d g grows with z: compare it relative to its size
    torch.testing.assert_close(dgates.double() / scale, ref[2].grad / scale, **close)
    torch.testing.assert_close(act_g[:, 0].double(), torch.nn.functional.silu(z.double()) * u * g, **close)
