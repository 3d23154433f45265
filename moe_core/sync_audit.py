"""Find host synchronisations without a GPU: record the aten ops that make the host wait for the
device (a value read back, or an output shape that depends on tensor values).

On a GPU each of these blocks the Python thread until the queue drains; on a CPU they cost
nothing, which is why they go unnoticed there. `SyncAudit` counts them on any device, so a CPU
test can assert that the GPU code path has none.

    with SyncAudit() as audit:
        model(idx, targets).loss.backward()
    assert not audit.ops, audit.ops
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result the host must read before it can go on.
_ALWAYS = {
    "aten::_local_scalar_dense",  # .item(), float(t), int(t), bool(t)
    "aten::nonzero",
    "aten::bincount",
    "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::masked_select",
    "aten::_assert_async",
    "aten::equal",
}
# Tensor methods that read values on the host without an aten op on a CPU tensor (on a GPU
# tensor they first copy to the host, which the dispatch mode sees as well).
_HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__}


def _sync_reason(func, args, kwargs) -> str | None:
    name = func._schema.name
    if name in _ALWAYS:
        return name
    if name == "aten::repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") \
            and kwargs.get("output_size") is None:
        return "aten::repeat_interleave (tensor repeats, no output_size)"
    if name in ("aten::_to_copy", "aten::copy_") and _device_to_host(name, args, kwargs):
        return f"{name} (device to host)"
    if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            return f"{name} (boolean mask)"
    return None


def _device_to_host(name: str, args, kwargs) -> bool:
    if name == "aten::copy_":
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    src, device = args[0], kwargs.get("device")
    return device is not None and torch.device(device).type == "cpu" and src.device.type != "cpu"


class _Dispatch(TorchDispatchMode):
    def __init__(self, ops: Counter[str]) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _sync_reason(func, args, kwargs)
        if reason is not None:
            self.ops[reason] += 1
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, ops: Counter[str]) -> None:
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.ops[f"Tensor.{func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


class SyncAudit:
    """Records every synchronising op run inside it, forward and backward, in `ops`
    (op name -> count)."""

    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self._modes = (_Function(self.ops), _Dispatch(self.ops))

    def __enter__(self) -> "SyncAudit":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
