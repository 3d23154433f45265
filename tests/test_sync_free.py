"""The GPU code path of the MoE layers (`backend: grouped`) is sync-free, atomic-free,
deterministic, compiles whole, and takes any expert count. Run on CPU, where the same code runs."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_core import build_model
from moe_core.moe.dispatch import combine, gather_rows, sort_by_expert
from moe_core.moe.grouped_gemm import grouped_matmul, offsets_from_counts
from moe_core.sync_audit import SyncAudit
from tests.conftest import experts, layer_forward, tiny

HETERO_SHARED = {"experts": [experts(4, 1, "1/2"), experts(8, 2, "1/4")], "shared_experts": 1, "shared_granularity": "1/4"}
LAYOUTS = {
    "layerwise": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")]},
    "unipool": {"layout": "unipool", "experts": [experts(16, 2, "1/2")], "router": {"scoring": "norm"},
                "balance": {"aux_weight": 0.0, "pool_weight": 0.01}},
    "unipool_groups": {"layout": "unipool", "experts": [experts(8, 2, "1/2")], "pool_group_size": 2},
    "hetero_shared": {"layout": "layerwise", **HETERO_SHARED},
    "sigmoid_renorm": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")],
                       "router": {"scoring": "sigmoid", "renormalize": True}},
    "pathmoe": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "router": {"block_size": 2},
                "balance": {"aux_weight": 0.0, "bias_rate": 0.01}},
    "global_aux": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "balance": {"aux_scope": "global_batch"}},
    "router_compute_dtype": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "router": {"dtype": "compute"}},
}


def _step(model, idx):
    out = model(idx[:, :-1], idx[:, 1:])
    out.loss.backward()
    model.finish_step()
    return out


ROUTINGS = {"dropless": {}, "cf1.25": {"capacity_factor": 1.25},
            "cf0.5_default_expert": {"capacity_factor": 0.5, "overflow": "default_expert"}}


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("name", LAYOUTS)
def test_training_step_makes_no_host_synchronisation(name, routing):
    model = build_model(tiny({**LAYOUTS[name], "backend": "grouped", **ROUTINGS[routing]}))
    idx = torch.randint(0, 48, (3, 17))
    _step(model, idx)  # first step: lazily built state
    with SyncAudit() as audit:
        _step(model, idx)
    assert not audit.ops, dict(audit.ops)


def test_the_audit_sees_what_it_must():
    """The detector itself: each of these would stall a GPU."""
    x, counts = torch.randn(6), torch.tensor([1, 2])
    with SyncAudit() as audit:
        torch.bincount(torch.tensor([0, 1, 1]))
        x[x > 0]
        x.nonzero()
        float(x.sum())
        counts.tolist()
        torch.arange(2).repeat_interleave(counts)
        torch.arange(2).repeat_interleave(counts, output_size=3)  # sized: no sync
    assert set(audit.ops) == {"aten::bincount", "aten::index (boolean mask)", "aten::nonzero", "aten::_local_scalar_dense",
                              "Tensor.tolist", "aten::repeat_interleave (tensor repeats, no output_size)"}


def test_routing_statistics_come_back_in_one_transfer():
    model = build_model(tiny({**LAYOUTS["unipool_groups"], "backend": "grouped"}))
    model(torch.randint(0, 48, (2, 16)))
    with SyncAudit() as audit:
        stats = model.routing_stats()
    assert sum(audit.ops.values()) == 1, dict(audit.ops)
    assert len(stats["layers"]) == 4 and len(stats["pools"]) == 2
    assert all(sum(layer["tokens_per_expert"]) == 2 * 16 * 2 for layer in stats["layers"])


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cap", [None, 5])
def test_gather_backward_is_the_combine_not_an_index_add(cap):
    T, K, E, D = 11, 3, 4, 6
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    d = sort_by_expert(ids, E, cap)
    x = torch.randn(T, D, requires_grad=True)
    g_PD = torch.randn(T * K, D)
    (gather_rows(x, d) * g_PD).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    (x.index_select(0, d.token_P) * g_PD).sum().backward()  # autograd's own: index_add
    torch.testing.assert_close(ours, x.grad, rtol=1e-6, atol=1e-6)

    y = gather_rows(x, d)
    with _RecordOps() as ops:
        y.backward(g_PD)
        combine(g_PD.requires_grad_(), d).sum().backward()
    forbidden = {n for n in ops.names if "index_add" in n or "scatter" in n or "index_put" in n}
    assert not forbidden, forbidden


def test_combine_sums_each_tokens_rows():
    T, K, E, D = 7, 2, 3, 4
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    d = sort_by_expert(ids, E)
    y_PD = torch.randn(T * K, D)
    expected = torch.zeros(T, D).index_add_(0, d.token_P, y_PD)
    torch.testing.assert_close(combine(y_PD, d), expected)


def test_dispatch_offsets_and_capacity_ranks_are_device_values():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 0]])
    d = sort_by_expert(ids, 4, cap=2)
    assert d.offsets_E.tolist() == [3, 4, 8, 8] and d.routed_E.tolist() == [3, 1, 4, 0]
    assert d.kept_E.tolist() == [2, 1, 2, 0] and int(d.num_dropped) == 3
    # Expert 2: tokens 0, 1, 3 choose it first and token 2 second; the first two first choices stay.
    assert torch.equal(d.keep_mask_TK()[:, 0], torch.tensor([True, True, True, False]))
    assert d.num_pairs == 8 and sorted(d.pair_P.tolist()) == list(range(8))
    assert torch.equal(d.pair_P[d.row_P], torch.arange(8))


@pytest.mark.parametrize("limit", [2, 3])
def test_grouped_gemm_over_its_per_call_group_limit_equals_the_loop(limit, monkeypatch):
    from moe_core.moe import grouped_gemm

    monkeypatch.setattr(grouped_gemm, "MAX_GROUPS_PER_CALL", limit)
    counts = [5, 0, 12, 3, 0, 7, 2]  # 7 groups: chunks of 2 or 3, with empty groups at the seams
    a = torch.randn(sum(counts), 16, requires_grad=True)
    b = torch.randn(len(counts), 16, 8, requires_grad=True)
    y = grouped_matmul(a, b, offsets_from_counts(counts))
    starts = [sum(counts[:e]) for e in range(len(counts))]
    loop = torch.cat([a[s : s + c] @ b[e] for e, (s, c) in enumerate(zip(starts, counts))])
    torch.testing.assert_close(y, loop)
    grad = torch.randn_like(y)
    da, db = torch.autograd.grad(y, (a, b), grad)
    da_ref, db_ref = torch.autograd.grad(loop, (a, b), grad)
    torch.testing.assert_close(da, da_ref)
    torch.testing.assert_close(db, db_ref)
    assert db[1].abs().sum() == 0 and db[4].abs().sum() == 0  # empty groups: zero gradient


@pytest.mark.parametrize("num_experts", [2048, 4096])
def test_thousands_of_experts_train(num_experts):
    """More experts than one grouped-GEMM call takes: the layer equals the reference loop."""
    moe = {"layout": "layerwise", "experts": [experts(num_experts, 2, "1/2")], "moe_every": 4}
    ref = build_model(tiny({**moe, "backend": "reference"}, n_layers=1))
    fast = build_model(tiny({**moe, "backend": "grouped"}, n_layers=1))
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 48, (2, 17))
    outs = []
    for model in (ref, fast):
        out = model(idx[:, :-1], idx[:, 1:])
        out.loss.backward()
        outs.append((out.loss.detach(), model.pools[0].sets[0].w13_EDF2.grad, model.routers[0].weight_ND.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_compiled_code_decides_on_the_fused_kernels_inside_the_trace(monkeypatch):
    """The switch to the Triton kernels (CUDA, eager) is asked once per expert set, by the grouped
    backend inside dynamo's trace, where `is_compiling()` holds (the backward passes keep the
    forward's answer): a compiled model on a GPU takes the plain ops, which inductor fuses, and
    never hands fake tensors to a raw Triton launch. Checked on CPU by a switch that fails when
    asked outside the trace."""
    from moe_core.moe import experts
    from moe_core.moe.experts import ExpertBank, experts_grouped

    asked = []

    def switch(t):
        if not torch.compiler.is_compiling():
            raise AssertionError("fused_kernels_available asked outside the compiled trace")
        asked.append(1)
        return False

    monkeypatch.setattr(experts, "fused_kernels_available", switch)
    d = sort_by_expert(torch.stack([torch.randperm(4)[:2] for _ in range(8)]), 4)
    bank = ExpertBank(4, 32, 16)
    torch.nn.init.normal_(bank.w13_EDF2), torch.nn.init.normal_(bank.w2_EFD)
    compiled = torch.compile(lambda x, g: experts_grouped(bank, x, d, g), fullgraph=True, backend="aot_eager")
    x, g = torch.randn(8, 32, requires_grad=True), torch.rand(8, 2, requires_grad=True)
    for _ in range(2):
        compiled(x, g).sum().backward()
    assert x.grad is not None and g.grad is not None and asked


@pytest.mark.parametrize("name", ["layerwise", "unipool", "hetero_shared", "router_compute_dtype"])
def test_moe_ffn_compiles_as_one_graph(name):
    """fullgraph=True: no graph break anywhere in routing, dispatch, experts or statistics (the
    compute-dtype router under bfloat16 autocast, where its dtype is the autocast one)."""
    model = build_model(tiny({**LAYOUTS[name], "capacity_factor": 1.25}))  # backend auto
    ffn = model.blocks[1].ffn
    router, pool = model.routers[ffn.router], model.pools[ffn.pool]
    compiled = torch.compile(ffn, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, 32)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "router_compute_dtype")
    grads = []
    for fn in (compiled, ffn):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        with autocast:
            y, routing = layer_forward(ffn, xi, fn)
        (y.square().sum() + routing.aux).backward()
        grads.append([y.detach(), xi.grad, router.weight_ND.grad, *(p.grad for p in pool.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_training_recompiles_nothing_as_routings_change(tmp_path, monkeypatch):
    """Five compiled steps of the trainer; after the first, a recompile would raise. Dynamo's
    behaviour does not depend on the compiler backend, so a fast one stands in for inductor."""
    from moe_core.train.callbacks import TrainCallback
    from moe_core.train.loop import train_trial
    from moe_core.trial import TrialConfig

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="aot_eager", **kw))
    routings = []

    class FailOnRecompile(TrainCallback):
        def on_step(self, step, row, model):
            routings.append(torch.cat([r.ids_TK for r in model.last_routing]).clone())
            if step == 1:
                torch.compiler.set_stance("fail_on_recompile")

    trial = TrialConfig.from_dict({
        "model": {"vocab_size": 257, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "seq_len": 32,
                  "moe": {"layout": "layerwise", "capacity_factor": 1.25, "experts": [experts(8, 2, "1/2")],
                          "balance": {"bias_rate": 0.01, "aux_scope": "global_batch"}}},
        "train": {"steps": 5, "batch_tokens": 256, "micro_batch_size": 4, "eval_every": 5, "eval_tokens": 256,
                  "log_routing_every": 2, "compile": True},
        "data": {"tokenizer": "bytes", "cache_dir": str(tmp_path / "cache")},
    })
    try:
        summary = train_trial(trial, tmp_path / "run", callbacks=[FailOnRecompile()])
    finally:
        torch.compiler.set_stance("default")
    assert summary.status == "completed" and summary.steps == 5
    assert any(not torch.equal(routings[0], r) for r in routings[1:])  # the routings did change


# -- on a GPU ------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("routing", ROUTINGS)
def test_gpu_training_step_never_waits_for_the_device(routing):
    model = build_model(tiny({**LAYOUTS["hetero_shared"], "backend": "auto", **ROUTINGS[routing]},
                             d_model=64, d_ff=128)).cuda()
    idx = torch.randint(0, 48, (4, 17), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _step(model, idx)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _step(model, idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@gpu
def test_gpu_backward_is_bitwise_deterministic():
    model = build_model(tiny({**LAYOUTS["layerwise"], "backend": "grouped"}, d_model=64, d_ff=128)).cuda()
    idx = torch.randint(0, 48, (8, 17), device="cuda")
    runs = []
    for _ in range(2):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(idx[:, :-1], idx[:, 1:]).loss.backward()
        runs.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def assert_within_error_model(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, length: int, c: float = 4.0):
    """|actual - ref| <= c * eps(dtype) * sqrt(length) * rms(ref), elementwise.

    Inputs rounded to `dtype` and an fp32 accumulation over `length` terms give errors that grow
    like sqrt(length) times the terms' size, and the terms' size is what sets the result's scale.
    """
    tol = c * torch.finfo(dtype).eps * length**0.5 * ref.double().pow(2).mean().sqrt()
    excess = float(((actual.double() - ref.double()).abs() / tol).max())
    assert excess <= 1, f"max error is {excess:.2f}x the error model's bound"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("g, E, K", [(1, 8, 1), (0.25, 32, 4), (0.125, 64, 8), (0.0625, 2048, 16)])
def test_gpu_grouped_backend_within_its_error_model(g, E, K, dtype):
    """Output and gradients of the grouped backend against the float64 reference loop."""
    from moe_core.moe.experts import ExpertBank, experts_grouped, experts_reference

    T, D = 2048, 512
    F = int(4 * D * g)
    gen = torch.Generator(device="cuda").manual_seed(0)
    bank = ExpertBank(E, D, F).cuda().double()
    torch.nn.init.normal_(bank.w13_EDF2, std=D**-0.5)
    torch.nn.init.normal_(bank.w2_EFD, std=F**-0.5)
    x = torch.randn(T, D, device="cuda", generator=gen, dtype=torch.float64)
    ids = torch.rand(T, E, device="cuda", generator=gen).topk(K, dim=-1).indices
    gates = torch.rand(T, K, device="cuda", generator=gen, dtype=torch.float64)
    d = sort_by_expert(ids, E)
    dy = torch.randn(T, D, device="cuda", generator=gen, dtype=torch.float64)
    results = []
    for b, run in ((bank, lambda b_, x_, g_: experts_reference(b_, x_, d, g_)),
                   (ExpertBank(E, D, F).cuda().to(dtype), lambda b_, x_, g_: experts_grouped(b_, x_, d, g_))):
        if b is not bank:
            b.load_state_dict(bank.state_dict())
        x_in = x.to(b.w2_EFD.dtype, copy=True).requires_grad_()  # a fresh leaf for each backend
        y = run(b, x_in, gates.to(b.w2_EFD.dtype))
        y.backward(dy.to(y.dtype))
        results.append((y.detach(), x_in.grad, b.w13_EDF2.grad, b.w2_EFD.grad))
    (y_ref, dx_ref, dw13_ref, dw2_ref), (y, dx, dw13, dw2) = results
    rows_per_expert = T * K // E
    assert_within_error_model(y, y_ref, dtype, D + F)
    assert_within_error_model(dx, dx_ref, dtype, D + 2 * F * K)
    assert_within_error_model(dw13, dw13_ref, dtype, D + rows_per_expert)
    assert_within_error_model(dw2, dw2_ref, dtype, D + rows_per_expert)


@pytest.mark.gpu
@gpu
def test_gpu_experts_without_rows_get_exactly_zero_weight_gradients():
    """torch._grouped_mm may leave an empty group's weight gradient unwritten (reported on
    Blackwell; Hopper writes zeros): the grouped backend must give exactly zero there. Under
    deterministic mode torch fills every fresh allocation with NaN, so an unwritten slice shows."""
    E, D, F = 16, 256, 128
    counts = [0, 48, 0, 16, 32, 0, 0, 64, 16, 0, 32, 0, 16, 0, 48, 0]  # half the experts empty
    offsets = offsets_from_counts(counts, device="cuda")
    a = torch.randn(sum(counts), D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) * 0.05).requires_grad_()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert torch.empty(4, device="cuda").isnan().all()  # the fill is on
        grouped_matmul(a, w, offsets).float().square().sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    empty = torch.tensor([c == 0 for c in counts], device="cuda")
    assert torch.isfinite(w.grad).all()
    assert (w.grad[empty] == 0).all() and (w.grad[~empty] != 0).any()
