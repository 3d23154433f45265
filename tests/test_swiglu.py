"""The gated SwiGLU: hand-written backward and the fused Triton kernels against autograd."""

import pytest
import torch
import torch.nn.functional as F

from moe_core.moe.experts import gated_swiglu


def _autograd(h, g):
    width = h.shape[-1] // 2
    return F.silu(h[:, :width]) * h[:, width:] * g[:, None]


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "triton"])
@pytest.mark.parametrize("rows, width", [(37, 24), (5, 200)])  # partial tiles in both directions
def test_gated_swiglu_equals_autograd(fused, rows, width):
    if fused:
        pytest.importorskip("triton")
    h = torch.randn(rows, 2 * width, dtype=torch.float64 if not fused else torch.float32, requires_grad=True)
    g = torch.rand(rows, dtype=h.dtype, requires_grad=True)
    d_a = torch.randn(rows, width, dtype=h.dtype)
    ours = gated_swiglu(h, g, fused=fused)
    grads = torch.autograd.grad(ours, (h, g), d_a)
    ref = _autograd(h, g)
    ref_grads = torch.autograd.grad(ref, (h, g), d_a)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_fused_swiglu_keeps_the_storage_dtype_and_computes_in_float32():
    pytest.importorskip("triton")
    h = torch.randn(16, 64).bfloat16()
    g = torch.rand(16).bfloat16()
    a = gated_swiglu(h, g, fused=True)
    assert a.dtype == torch.bfloat16
    ref = _autograd(h.float(), g.float())
    torch.testing.assert_close(a.float(), ref, rtol=1e-2, atol=1e-2)
