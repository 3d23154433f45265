"""The Triton expert backend against the reference loop: outputs and every gradient.

On CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), at tiny
sizes; tests marked gpu repeat the comparison compiled, at real sizes, when a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from moe_core.moe.dispatch import capacity, sort_by_expert  # noqa: E402
from moe_core.moe.experts import ExpertBank, experts_reference, experts_triton  # noqa: E402

from .conftest import experts, tiny  # noqa: E402


def _bank(E: int, D: int, F: int, device="cpu", dtype=torch.float32) -> ExpertBank:
    bank = ExpertBank(E, D, F).to(device=device, dtype=dtype)
    torch.nn.init.normal_(bank.w13_EDF2, std=0.1)
    torch.nn.init.normal_(bank.w2_EFD, std=0.1)
    return bank


def _run(fn, bank, x, gates, *args):
    for t in (x, gates, bank.w13_EDF2, bank.w2_EFD):
        t.grad = None
    y = fn(bank, x, *args)
    (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    return y.detach(), [t.grad.detach().clone() for t in (x, gates, bank.w13_EDF2, bank.w2_EFD)]


def _routing(kind: str, T: int, E: int, K: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if kind == "empty_experts":  # only experts 0 and 1 get tokens
        return torch.stack([torch.randperm(2, generator=gen)[:K] for _ in range(T)])
    if kind == "one_expert_takes_all":
        return torch.zeros(T, 1, dtype=torch.long)
    if kind == "uneven":  # skewed counts, several tiles for the busiest expert
        p = torch.tensor([0.6, 0.25, 0.1, 0.05] + [0.0] * (E - 4))
        return torch.stack([torch.multinomial(p, K, generator=gen) for _ in range(T)])
    raise ValueError(kind)


@pytest.mark.parametrize("kind, K, cap", [
    ("uniform", 1, None), ("uniform", 2, None), ("uniform", 4, None), ("empty_experts", 2, None),
    ("one_expert_takes_all", 1, None), ("uneven", 2, None), ("uniform", 2, 1.0), ("uneven", 2, 1.25),
])
def test_triton_matches_reference(kind, K, cap):
    gen = torch.Generator().manual_seed(0)
    T, D, F, E = 40, 32, 16, 8
    bank = _bank(E, D, F)
    x = torch.randn(T, D, generator=gen).requires_grad_()
    ids = _routing(kind, T, E, K, gen)
    gates = torch.rand(ids.shape, generator=gen).requires_grad_()
    d = sort_by_expert(ids, E, None if cap is None else capacity(cap, T, ids.shape[1], E))
    y_ref, g_ref = _run(lambda b, x_, *a: experts_reference(b, x_, ids, gates, d.keep_mask_TK()), bank, x, gates)
    y_tri, g_tri = _run(lambda b, x_, *a: experts_triton(b, x_, d, gates), bank, x, gates)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("x", "gates", "w13", "w2"), g_tri, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_triton_bfloat16_accumulates_in_float32():
    gen = torch.Generator().manual_seed(1)
    T, D, F, E = 32, 32, 16, 4
    bank = _bank(E, D, F)
    x = torch.randn(T, D, generator=gen)
    ids = _routing("uniform", T, E, 2, gen)
    gates = torch.rand(ids.shape, generator=gen)
    d = sort_by_expert(ids, E)
    ref = experts_reference(bank, x, ids, gates, d.keep_mask_TK())
    bank16 = _bank(E, D, F, dtype=torch.bfloat16)
    with torch.no_grad():
        bank16.w13_EDF2.copy_(bank.w13_EDF2), bank16.w2_EFD.copy_(bank.w2_EFD)
    y16 = experts_triton(bank16, x.bfloat16(), d, gates.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("moe", [
    {"layout": "layerwise", "experts": [experts(8, 2, "1/2")]},
    {"layout": "layerwise", "experts": [experts(4, 1, "1/2"), experts(8, 2, "1/4")], "shared_experts": 1, "shared_granularity": "1/4"},
    {"layout": "unipool", "experts": [experts(16, 2, "1/2")], "router": {"scoring": "norm"}, "balance": {"aux_weight": 0.0, "pool_weight": 0.01}},
    {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "capacity_factor": 1.0},
])
def test_whole_model_triton_equals_reference(moe):
    """Heterogeneous sets (one call per set), UniPool (one weight used by every layer) and
    dropping: the loss and every parameter's gradient agree with the reference backend."""
    cfg = tiny(moe)
    from moe_core import build_model

    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1))
    grads = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)  # a fresh model each time: the pool loss keeps state between steps
        model = build_model(cfg)
        for layer in model.modules():
            if hasattr(layer, "backend"):
                layer.backend = backend
        model.zero_grad()
        out = model(idx[:, :-1], idx[:, 1:])
        out.loss.backward()
        grads[backend] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads["triton"][0], grads["reference"][0], rtol=1e-5, atol=1e-6)
    assert grads["triton"][1].keys() == grads["reference"][1].keys()
    for name, g in grads["reference"][1].items():
        torch.testing.assert_close(grads["triton"][1][name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_torch_compile_traces_around_the_custom_op():
    from moe_core.moe.triton_experts import triton_experts_op

    gen = torch.Generator().manual_seed(2)
    T, D, F, E = 16, 32, 16, 4
    bank = _bank(E, D, F)
    x = torch.randn(T, D, generator=gen, requires_grad=True)
    ids = _routing("uniform", T, E, 2, gen)
    d = sort_by_expert(ids, E)
    gates_P = torch.rand(d.pair_P.numel(), generator=gen, requires_grad=True)

    def f(x, g, w13, w2):
        return triton_experts_op(x, g, w13, w2, d.token_P, d.row_P, d.routed_E, d.num_pairs)[0].sum()

    eager = f(x, gates_P, bank.w13_EDF2, bank.w2_EFD)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, gates_P, bank.w13_EDF2, bank.w2_EFD)
    torch.testing.assert_close(compiled, eager)
    compiled.backward()
    assert x.grad is not None and gates_P.grad is not None


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    from moe_core.errors import ConfigError

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    bank = _bank(4, 32, 16)
    d = sort_by_expert(torch.zeros(4, 1, dtype=torch.long), 4)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        experts_triton(bank, torch.randn(4, 32), d, torch.ones(4, 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("g, E, K", [(1, 8, 1), (0.25, 32, 4), (0.125, 64, 8), (0.0625, 128, 16)])
def test_triton_matches_reference_on_gpu(g, E, K):
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    T, D = 4096, 1024
    F = int(4 * D * g)
    bank = _bank(E, D, F, device="cuda")
    x = torch.randn(T, D, device="cuda", generator=gen, requires_grad=True)
    ids = torch.stack([torch.randperm(E, device="cuda", generator=gen)[:K] for _ in range(T)])
    gates = torch.rand(ids.shape, device="cuda", generator=gen, requires_grad=True)
    d = sort_by_expert(ids, E)
    y_ref, g_ref = _run(lambda b, x_, *a: experts_reference(b, x_, ids, gates, d.keep_mask_TK()), bank, x, gates)
    y_tri, g_tri = _run(lambda b, x_, *a: experts_triton(b, x_, d, gates), bank, x, gates)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
