"""The combine (each token's sum over its K rows) and the gather's backward: the fused Triton
kernel that CUDA uses in eager mode against the plain gather-and-sum, outputs and gradients.

On CPU the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1); the fused
path is forced where `experts.fused_kernels_available` would pick it on a GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from moe_core.moe.dispatch import combine, gather_rows, sort_by_expert  # noqa: E402
from moe_core.moe.triton_combine import BLOCK_N, BLOCK_T, combine_rows  # noqa: E402
from moe_core.moe.triton_experts import INTERPRETED  # noqa: E402
from tests.conftest import experts, tiny  # noqa: E402


def _dispatch(T: int, K: int, E: int, cap: int | None = None, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]  # K distinct experts per token
    return sort_by_expert(ids.to(device), E, cap)


def _plain(rows_PN: torch.Tensor, d) -> torch.Tensor:
    """What the combine means: token t gets the sum of the rows whose token is t."""
    return torch.zeros(d.num_tokens, rows_PN.shape[1], dtype=torch.float64).index_add_(
        0, d.token_P, rows_PN.double())


def _slot_order_sum(rows_PN: torch.Tensor, d) -> torch.Tensor:
    """The kernel's arithmetic: float32, slot 0 first, then each slot in turn."""
    acc = torch.zeros(d.num_tokens, rows_PN.shape[1], device=rows_PN.device)
    for slot in rows_PN.float().index_select(0, d.row_P).view(-1, d.num_tokens, rows_PN.shape[1]):
        acc += slot
    return acc


def _bfloat16_roundings(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x rounded to bfloat16 to nearest (compiled Triton, as torch) and truncated (what Triton
    3.9's CPU interpreter does: 1 + 3 * 2**-9 becomes 1.0, not 1.0078125)."""
    return x.bfloat16(), (x.view(torch.int32) & -65536).view(torch.float32).bfloat16()


# Partial tiles in both directions (T, N not multiples of BLOCK_T, BLOCK_N) and several tiles.
@pytest.mark.parametrize("T, K, N", [(BLOCK_T + 5, 3, BLOCK_N + 44), (9, 1, 24), (2 * BLOCK_T, 8, 16)])
def test_fused_combine_equals_the_sum_of_each_tokens_rows(T, K, N):
    d = _dispatch(T, K, max(K, 5))
    rows = torch.randn(T * K, N, dtype=torch.float32)
    out = combine_rows(rows, d.row_P, T)
    torch.testing.assert_close(out, _slot_order_sum(rows, d), rtol=0, atol=0)
    torch.testing.assert_close(out.double(), _plain(rows, d), rtol=1e-5, atol=1e-5)


def test_fused_combine_sums_low_precision_rows_in_float32_and_rounds_once():
    T, K, N = 16, 8, 32
    d = _dispatch(T, K, 8)
    rows = torch.randn(T * K, N).bfloat16()
    out = combine_rows(rows, d.row_P, T)
    assert out.dtype == torch.bfloat16
    nearest, truncated = _bfloat16_roundings(_slot_order_sum(rows, d))
    assert ((out == nearest) | (out == truncated)).all()  # one rounding of the float32 sum, no other error
    if not INTERPRETED:
        assert torch.equal(out, nearest)


def test_fused_combine_takes_any_layout_of_rows():
    """A gradient can reach the gather's backward expanded (stride 0) or transposed."""
    T, K, N = 6, 2, 5
    d = _dispatch(T, K, 3)
    expanded = torch.ones(1, 1).expand(T * K, N)
    torch.testing.assert_close(combine_rows(expanded, d.row_P, T), torch.full((T, N), float(K)))
    transposed = torch.randn(N, T * K).t()
    torch.testing.assert_close(combine_rows(transposed, d.row_P, T), _slot_order_sum(transposed, d), rtol=0, atol=0)


@pytest.mark.parametrize("cap", [None, 4])
def test_gather_and_combine_give_the_same_values_and_gradients_fused_or_plain(cap):
    T, K, E, D = 21, 3, 6, 40
    d = _dispatch(T, K, E, cap)
    x = torch.randn(T, D)
    g_PD = torch.randn(T * K, D)
    results = {}
    for fused in (False, True):
        x_in = x.clone().requires_grad_()
        rows = gather_rows(x_in, d, fused) * g_PD  # the combine's input: a function of the gathered rows
        y = combine(rows, d, fused)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        results[fused] = (y.detach(), x_in.grad)
    for plain, fused in zip(results[False], results[True]):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_fused_combine_on_the_gpu_rounds_the_slot_order_float32_sum_to_nearest(monkeypatch):
    """Compiled, at the layer bench's size: bit for bit the float32 sum in slot order rounded
    once to nearest, and what `combine` (which picks the kernel on CUDA) gives."""
    T, K, N = 4096, 8, 1024
    d = _dispatch(T, K, 64, device="cuda")
    rows = torch.randn(T * K, N, device="cuda").bfloat16()
    out = combine_rows(rows, d.row_P, T)
    assert torch.equal(out, _slot_order_sum(rows, d).bfloat16())
    plain = rows.index_select(0, d.row_P).view(K, T, N).sum(dim=0)  # what CUDA ran before the kernel
    # The same but for torch's summation order: at most one bfloat16 step apart.
    torch.testing.assert_close(out.float(), plain.float(), rtol=2**-7, atol=1e-5)
    calls = []
    monkeypatch.setattr("moe_core.moe.triton_combine.combine_rows",
                        lambda *args: calls.append(1) or combine_rows(*args))
    assert torch.equal(combine(rows, d, fused=True), out) and calls == [1]  # the fused combine is the kernel


@pytest.mark.parametrize("moe", [
    {"layout": "layerwise", "experts": [experts(8, 2, "1/2")], "capacity_factor": 1.0},
    {"layout": "layerwise", "experts": [experts(4, 1, "1/2"), experts(8, 2, "1/4")], "shared_experts": 1,
     "shared_granularity": "1/4"},
    {"layout": "unipool", "experts": [experts(16, 2, "1/2")], "router": {"scoring": "norm"},
     "balance": {"aux_weight": 0.0, "pool_weight": 0.01}},
], ids=["layerwise_cf1", "hetero_shared", "unipool"])
def test_grouped_backend_with_the_fused_kernels_equals_it_without(moe, monkeypatch):
    """The grouped backend as it runs on CUDA in eager mode (fused SwiGLU and combine, here under
    Triton's interpreter) against the plain ops: the loss and every parameter's gradient."""
    from moe_core import build_model
    from moe_core.moe import experts as backends

    cfg = tiny({**moe, "backend": "grouped"})
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1))
    results = []
    for fused in (False, True):
        monkeypatch.setattr(backends, "fused_kernels_available", lambda t, fused=fused: fused)
        torch.manual_seed(0)  # the same model each time
        model = build_model(cfg)
        out = model(idx[:, :-1], idx[:, 1:])
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (fused_loss, fused_grads) = results
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
