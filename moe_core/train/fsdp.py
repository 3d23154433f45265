"""Sharded data parallelism (`train.sharding: fsdp`) with FSDP2's `fully_shard`.

Units, each gathered only while it is needed:
- every decoder block, with its expert pool when the layout is layerwise (that pool serves only
  this block);
- every UniPool pool on its own: several blocks use it, so it is gathered once, at its first use
  in the forward, and stays gathered until the end of the backward (as `moe_core.memory`
  models it);
- the root, the model itself: embeddings, head, final norm and the routers (a PathMoE router
  serves several blocks; FSDP2 keeps the root gathered for the whole step).

On CUDA the gathered parameters are bfloat16 and gradients are reduced in float32; on CPU
everything stays float32. Gradients are reduce-scattered after every micro-batch's backward (no
unsharded gradients are kept across micro-batches). Scalar parameters (NormRouter's sigma) cannot
be sharded: they stay replicated and their gradients are averaged over workers by a hook.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from moe_core.model import MoETransformer
from moe_core.moe.parts import ExpertPool, PoolCast
from moe_core.train.distributed import DataParallel


def shard_model(model: MoETransformer, device: torch.device, dp: DataParallel) -> None:
    """Shard `model` in place over all `dp` workers. Build the optimizer afterwards: its
    parameters are the shards (DTensors)."""
    replicated = {p for p in model.parameters() if p.dim() == 0}
    options = {"mesh": init_device_mesh(device.type, (dp.world_size,)), "mp_policy": _precision(device),
               "ignored_params": replicated}
    layerwise = model.cfg.moe.layout == "layerwise"
    with_blocks: set[nn.Parameter] = set()
    for block in model.blocks:
        if layerwise and block.ffn in model.moe_layers:
            pool = model.pools[block.ffn.pool]
            _shard_with(block, pool, options)
            _gather_on_cast(pool, block)
            with_blocks |= set(pool.parameters())
        else:
            fully_shard(block, **options)
    if not layerwise:
        for pool in model.pools:
            fully_shard(pool, **options)
            _gather_on_cast(pool, pool)
    fully_shard(model, **{**options, "ignored_params": replicated | with_blocks})
    for p in replicated:
        p.register_post_accumulate_grad_hook(partial(_average_grad, dp))


def _precision(device: torch.device) -> MixedPrecisionPolicy:
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _shard_with(block: nn.Module, pool: ExpertPool, options: dict[str, Any]) -> None:
    """One unit of a block and a pool that is not its submodule: `fully_shard` takes the
    parameters under the module it is given, so the block holds the pool for the call."""
    block.add_module("pool", pool)
    try:
        fully_shard(block, **options)
    finally:
        delattr(block, "pool")


def _gather_on_cast(pool: ExpertPool, unit: FSDPModule) -> None:
    """A layer reads its pool's weights through `ExpertPool.cast` (`MoEParts.weights`). A
    layerwise pool is part of its block's unit, gathered by the block's forward hooks before
    that; a UniPool pool has no forward of its own, so FSDP's hooks would never gather it: gather
    the unit holding it there (like `register_fsdp_forward_method`, without the reshard after the
    call). A UniPool pool then stays gathered until FSDP reshards it after the backward."""
    cast = pool.cast

    def cast_gathered(dtype: torch.dtype) -> tuple[PoolCast, ...]:
        unit.unshard()
        return cast(dtype)

    pool.cast = cast_gathered


def _average_grad(dp: DataParallel, param: torch.Tensor) -> None:
    """After each backward of a replicated parameter. Over several micro-batches the gradient
    already holds the earlier ones' average, the same on every worker, which averaging keeps."""
    dp.sum_(param.grad).div_(dp.world_size)


def plain(t: torch.Tensor) -> torch.Tensor:
    """A value the same on every worker (such as the gradient norm) as a plain tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t
