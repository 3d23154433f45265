"""The per-GPU memory estimate (`moe_core.memory`) against what the model and optimizer hold."""

from __future__ import annotations

import math

import pytest
import torch

from moe_core import ModelConfig, MoEConfig
from moe_core.accounting import count_params
from moe_core.memory import (
    CONTEXT_BYTES,
    CPU_POLICY,
    CUDA_POLICY,
    DEFAULT_HEADROOM,
    TERMS,
    MemoryEstimate,
    _block_params,
    _root_params,
    _shared_pools_params,
    activation_bytes,
    choose_sharding,
    estimate_memory,
    fits,
    usable_bytes,
)
from moe_core.model import build_model
from moe_core.train.config import TrainConfig
from moe_core.train.evaluation import autocast
from moe_core.train.loop import _optimizer
from moe_core.trial import TrialConfig
from orchestrator.hardware import HARDWARE
from tests.conftest import experts, tiny

CONFIGS = {
    "dense": tiny(),
    "layerwise": tiny({"layout": "layerwise", "experts": [experts(4, 2)]}),
    "unipool": tiny({"layout": "unipool", "experts": [experts(8, 2, "1/2")], "router": {"scoring": "norm"}}),
    "pathmoe": tiny({"layout": "layerwise", "experts": [experts(4, 1)], "shared_experts": 1,
                     "router": {"block_size": 2}}),
}
CPU_TRAIN = TrainConfig(micro_batch_size=8, device="cpu")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name", CONFIGS)
def test_exact_terms_match_model_and_optimizer(name):
    cfg = CONFIGS[name]
    trial = TrialConfig(model=cfg, train=CPU_TRAIN)
    model = build_model(cfg)
    optimizer = _optimizer(model, trial, torch.device("cpu"))
    x = torch.randint(0, cfg.vocab_size, (CPU_TRAIN.micro_batch_size, cfg.seq_len))
    model(x, x).loss.backward()
    grads = _bytes(p.grad for p in model.parameters())
    optimizer.step()

    est = estimate_memory(cfg, CPU_TRAIN)
    params = list(model.parameters())
    assert est.weights == _bytes(params)
    assert est.gradients == grads
    states = [optimizer.state[p] for p in params]
    assert est.optimizer_states == _bytes(s[k] for s in states for k in ("exp_avg", "exp_avg_sq"))
    # The rest of AdamW's state is one scalar step counter per tensor, which the estimate leaves out.
    assert all(v.numel() == 1 for s in states for k, v in s.items() if k not in ("exp_avg", "exp_avg_sq"))
    assert est.compute_weights == 0  # float32 on one CPU worker


@pytest.mark.parametrize("name", CONFIGS)
def test_fsdp_units_partition_the_parameters(name):
    cfg = CONFIGS[name]
    root = _root_params(cfg)
    assert root >= count_params(cfg).embedding
    assert root + sum(_block_params(cfg)) + _shared_pools_params(cfg) == count_params(cfg).total


@pytest.mark.parametrize("name", CONFIGS)
def test_sharding_divides_the_persistent_terms(name):
    cfg = CONFIGS[name]
    train = CPU_TRAIN.replace(device="cuda")
    total = count_params(cfg).total
    one = estimate_memory(cfg, train)
    ddp = estimate_memory(cfg, train, workers=4)
    assert (ddp.weights, ddp.gradients, ddp.optimizer_states) == (one.weights, one.gradients, one.optimizer_states)
    assert ddp.total == one.total  # DDP's buckets are views of the gradients: nothing more per GPU
    for workers in (1, 3, 8):
        fsdp = estimate_memory(cfg, train, workers=workers, sharding="fsdp")
        shard = math.ceil(total / workers)
        assert (fsdp.weights, fsdp.gradients, fsdp.optimizer_states) == (4 * shard, 4 * shard, 8 * shard)
        assert fsdp.activations == one.activations
        assert fsdp.compute_weights == estimate_memory(cfg, train, workers=2, sharding="fsdp").compute_weights
    assert one.compute_weights == 2 * (total - count_params(cfg).router - cfg.vocab_size * cfg.d_model
                                       - (2 * cfg.n_layers + 1) * cfg.d_model)


def test_estimate_is_typed_and_serialisable():
    est = estimate_memory(CONFIGS["unipool"], CPU_TRAIN, workers=2, sharding="fsdp", checkpointing=True)
    assert isinstance(est, MemoryEstimate)
    d = est.to_dict()
    assert d["total"] == est.total == sum(d[k] for k in TERMS)
    assert (d["sharding"], d["workers"], d["checkpointing"]) == ("fsdp", 2, True)
    with pytest.raises(Exception):
        est.weights = 0  # frozen


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("policy", [CPU_POLICY, CUDA_POLICY])
def test_activations_grow_with_micro_batch_and_shrink_with_checkpointing(name, policy):
    cfg = CONFIGS[name]
    sizes = [activation_bytes(cfg, mb, policy) for mb in (1, 2, 4, 8)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    for mb in (1, 4):
        assert activation_bytes(cfg, mb, policy, checkpointing=True) < activation_bytes(cfg, mb, policy)


@pytest.mark.parametrize("name", CONFIGS)
def test_activations_match_what_autograd_saves(name):
    """float32 on CPU with the GPU's expert backend: the tensors autograd saves (counted once per
    storage), plus the logits, equal the estimate up to what the CPU kernels save on top: RMSNorm
    is not fused there (it keeps its normalised output) and the attention output is copied
    before `wo` (flash attention on CUDA returns it in the layout `wo` reads)."""
    cfg = CONFIGS[name]
    cfg = cfg.replace(moe=cfg.moe.replace(backend="grouped")) if cfg.moe.is_moe else cfg
    model = build_model(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    mb = CPU_TRAIN.micro_batch_size
    x = torch.randint(0, cfg.vocab_size, (mb, cfg.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, x)
    measured = sum(saved.values()) + out.logits.untyped_storage().nbytes()
    estimate = activation_bytes(cfg, mb, CPU_POLICY)
    cpu_extra = mb * cfg.seq_len * 4 * cfg.d_model * ((2 * cfg.n_layers + 1) + cfg.n_layers)
    assert 0.98 * estimate <= measured <= 1.02 * (estimate + cpu_extra)


# -- choosing a sharding -----------------------------------------------------------------------

BIG = ModelConfig(
    vocab_size=50304, d_model=1536, n_layers=24, n_heads=16, n_kv_heads=4, d_ff=6144, seq_len=1024,
    moe=MoEConfig(layout="unipool", experts=({"num_experts": 192, "top_k": 1},), router={"scoring": "norm"}),
)
GPU_TRAIN = TrainConfig(micro_batch_size=1, device="cuda")


def _device_for(total: int) -> int:
    """The smallest device (to a byte or two) on which an estimate of `total` fits."""
    return math.ceil((total + CONTEXT_BYTES + 2) / (1 - DEFAULT_HEADROOM))


def _total(workers: int, sharding: str) -> int:
    return estimate_memory(BIG, GPU_TRAIN, workers=workers, sharding=sharding).total


def test_fits_keeps_headroom():
    est = estimate_memory(BIG, GPU_TRAIN)
    device = _device_for(est.total)
    assert fits(est, device) and not fits(est, device - 4)
    assert usable_bytes(device, headroom=0.0) == device - CONTEXT_BYTES


def test_picker_chooses_none_when_it_fits():
    choice = choose_sharding(BIG, GPU_TRAIN, workers=4, mode="auto", device_bytes=_device_for(_total(4, "none")))
    assert choice.fits and choice.sharding == "none" and choice.estimate.total == _total(4, "none")


def test_picker_chooses_fsdp_when_only_sharding_fits():
    device = _device_for(_total(4, "fsdp"))
    assert _total(4, "none") > usable_bytes(device)
    choice = choose_sharding(BIG, GPU_TRAIN, workers=4, mode="auto", device_bytes=device)
    assert choice.fits and choice.sharding == "fsdp" and choice.estimate.workers == 4
    assert choose_sharding(BIG, GPU_TRAIN, workers=4, mode="fsdp", device_bytes=device).sharding == "fsdp"
    refused = choose_sharding(BIG, GPU_TRAIN, workers=4, mode="none", device_bytes=device)
    assert not refused.fits
    assert refused.reason.startswith(f"needs {_total(4, 'none') / 1e9:.1f} GB per GPU with DDP over 4 workers")
    assert refused.reason.endswith("fits with fsdp over 4")


def test_picker_names_the_fsdp_that_would_fit():
    device = _device_for(_total(8, "fsdp"))
    assert _total(4, "fsdp") > usable_bytes(device)  # so 8 is the fewest (of 1, 2, 4, 8, ...)
    one = choose_sharding(BIG, GPU_TRAIN, workers=1, mode="auto", device_bytes=device)
    assert not one.fits and one.estimate.sharding == "none"
    assert one.reason == (f"needs {_total(1, 'none') / 1e9:.1f} GB per GPU with 1 worker "
                          f"({usable_bytes(device) / 1e9:.1f} GB usable); fits with fsdp over 8")
    two = choose_sharding(BIG, GPU_TRAIN, workers=2, mode="auto", device_bytes=device)
    assert not two.fits and two.estimate.sharding == "fsdp"  # the smaller of the two it tried
    assert "with fsdp over 2 workers" in two.reason and two.reason.endswith("fits with fsdp over 8")


def test_picker_skips_what_fits_nowhere():
    choice = choose_sharding(BIG, GPU_TRAIN, workers=8, mode="auto", device_bytes=8 << 30)
    assert not choice.fits and choice.sharding is None
    assert "fits nowhere: fsdp over 1024 still needs" in choice.reason


def test_picker_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="auto, none or fsdp"):
        choose_sharding(BIG, GPU_TRAIN, workers=1, mode="zero3", device_bytes=80 << 30)
    with pytest.raises(ValueError, match="none or fsdp"):
        estimate_memory(BIG, GPU_TRAIN, sharding="auto")


def test_every_gpu_has_its_memory():
    gpus = [h for h in HARDWARE.values() if h.unit == "GPU"]
    assert gpus and all(h.memory_bytes and h.memory_bytes > 40e9 for h in gpus)
    assert HARDWARE["h100"].memory_bytes == 81559 << 20  # what nvidia-smi reports
    assert HARDWARE["cpu"].memory_bytes is None


def test_worked_example_of_the_docs():
    """docs/memory.md: UniPool 978M at micro-batch 8 on 8 H100s needs fsdp."""
    model = BIG.replace(moe=BIG.moe.replace(balance={"aux_weight": 0.0, "pool_weight": 0.01, "z_weight": 0.0}),
                        rope_base=1e6, init_std=0.01)
    train = TrainConfig(device="cuda")
    h100 = HARDWARE["h100"].memory_bytes
    auto = choose_sharding(model, train, workers=8, mode="auto", device_bytes=h100)
    assert auto.sharding == "fsdp" and round(auto.estimate.total / 1e9, 1) == 66.0
    ddp = choose_sharding(model, train, workers=8, mode="none", device_bytes=h100)
    assert ddp.reason == "needs 164.2 GB per GPU with DDP over 8 workers (75.9 GB usable); fits with fsdp over 8"


# -- against a real GPU ------------------------------------------------------------------------

GPU_BASE = dict(vocab_size=8192, d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=2048, seq_len=1024)
GPU_MOES = {
    "dense": {},
    "layerwise": {"layout": "layerwise", "experts": [experts(8, 2, "1/2")]},
    "unipool": {"layout": "unipool", "experts": [experts(16, 2, "1/2")], "router": {"scoring": "norm"},
                "balance": {"aux_weight": 0.0, "pool_weight": 0.01}},
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", GPU_MOES)
def test_estimate_matches_cuda_peak(name):
    """Three optimizer steps of two micro-batches the way `train_trial` runs them (fused AdamW,
    bf16 autocast, clipping, the `result` of a micro-batch alive until the next one's forward);
    the peak comes in a later micro-batch's backward, with every state allocated."""
    cfg = ModelConfig(**GPU_BASE, moe=MoEConfig(**GPU_MOES[name]))
    train = TrainConfig(micro_batch_size=4, batch_tokens=2 * 4 * cfg.seq_len, steps=3, device="cuda")
    trial = TrialConfig(model=cfg, train=train)
    device = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()

    model = build_model(cfg).to(device)
    optimizer = _optimizer(model, trial, device)
    accum = trial.accumulation_steps
    for _ in range(train.steps):
        for _ in range(accum):
            x = torch.randint(0, cfg.vocab_size, (train.micro_batch_size, cfg.seq_len), device=device)
            with autocast(device):
                result = model(x, x)
                (result.loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.finish_step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del model, optimizer, result

    est = estimate_memory(cfg, train)
    terms = ", ".join(f"{k} {getattr(est, k) / 1e6:.0f}" for k in TERMS)
    assert abs(peak - est.total) <= 0.15 * est.total, f"{name}: peak {peak / 1e6:.0f} MB, estimate MB: {terms}"
