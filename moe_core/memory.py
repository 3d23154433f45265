"""Bytes per GPU one trial needs, from its config alone, and the smallest sharding that fits.

The estimate models what the trainer (`train/loop.py`) does: float32 parameters, which are the
master weights (there is no other copy); float32 gradients; AdamW with two float32 moments per
parameter; the forward and backward under bfloat16 autocast on CUDA, in float32 on CPU; the
`grouped` expert backend and flash / memory-efficient `scaled_dot_product_attention` (no
sequence x sequence term). `docs/memory.md` derives every term; the names below follow it.

Shape legend: T tokens of one micro-batch (micro_batch_size * seq_len), D model dim, V vocabulary,
N routed experts of a layer, K = sum of the sets' top-k, P = K * T (token, slot) pairs, F width.

Sharding, for `workers` data-parallel workers:
- `none` (DDP): everything replicated. The trainer's DDP uses `gradient_as_bucket_view`, so its
  all-reduce buckets are the gradients themselves, not a second copy.
- `fsdp` (FSDP2 `fully_shard` per decoder block, mixed precision in the compute dtype): weights,
  gradients and optimizer states divided by the workers, plus unsharded compute-dtype parameters
  and gradients of the units being worked on (see `_fsdp_gathered`).

The estimate is of the peak of `torch.cuda.max_memory_allocated()`; `fits` adds the headroom the
allocator and the CUDA context need on top.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from moe_core.accounting import count_params
from moe_core.config import ModelConfig
from moe_core.train.config import TrainConfig

Sharding = Literal["none", "fsdp"]
ShardingMode = Literal["auto", "none", "fsdp"]

GB = 1e9  # reasons and docs speak decimal gigabytes, as GPU data sheets do
FP32 = 4
INDEX = 8  # int64 routing indices

# `fits` keeps this share of the device free: the caching allocator rounds blocks and cannot
# always reuse freed ones for differently sized MoE activations (reserved runs 5-15 % above
# allocated in practice).
DEFAULT_HEADROOM = 0.10
# Memory the allocator never counts: the CUDA context (about 0.5 GB on an H100) and NCCL's own
# buffers (a few hundred MB per communicator).
CONTEXT_BYTES = 1 << 30
# FSDP2 all-gathers the next block while the current one computes (implicit forward prefetch,
# explicit backward prefetch of one), so two blocks are unsharded at once.
FSDP_BLOCKS_IN_FLIGHT = 2
# Worker counts a trial that does not fit is told fsdp would fit over (the fewest that does).
SUGGESTED_WORKERS = tuple(2**i for i in range(1, 11))


@dataclass(frozen=True)
class DtypePolicy:
    """Bytes per element of what the trainer stores and computes in."""

    param_bytes: int = FP32  # the parameters are the master weights; also the residual stream
    grad_bytes: int = FP32  # gradients accumulate in the parameters' dtype
    optimizer_bytes: int = 2 * FP32  # AdamW's exp_avg and exp_avg_sq
    compute_bytes: int = 2  # matmul inputs and outputs: bf16 under autocast

    @property
    def autocast(self) -> bool:
        """Compute narrower than the parameters: every matmul casts its inputs (new tensors)."""
        return self.compute_bytes < self.param_bytes


CUDA_POLICY = DtypePolicy()
CPU_POLICY = DtypePolicy(compute_bytes=FP32)


def trainer_policy(train: TrainConfig) -> DtypePolicy:
    """The trainer's policy for `train.device`; `auto` is taken as CUDA, where memory matters."""
    return CPU_POLICY if train.device == "cpu" else CUDA_POLICY


TERMS = ("weights", "gradients", "optimizer_states", "compute_weights", "activations", "backward_peak")


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes on one GPU, by term; `total` is their sum. See docs/memory.md."""

    weights: int  # float32 parameters (this worker's shard under fsdp)
    gradients: int  # float32 gradients (shard under fsdp)
    optimizer_states: int  # AdamW moments (shard under fsdp)
    compute_weights: int  # compute-dtype weight copies held through forward and backward
    activations: int  # tensors saved for backward in one micro-batch, logits included
    backward_peak: int  # the backward's largest working set on top of the saved activations
    sharding: Sharding
    workers: int
    checkpointing: bool

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in TERMS)

    def to_dict(self) -> dict[str, int | str | bool]:
        return {**asdict(self), "total": self.total}


# -- parameters by where they live -------------------------------------------------------------


def _attention_params(cfg: ModelConfig) -> int:
    d, e = cfg.d_model, cfg.head_dim
    return 2 * d * cfg.n_heads * e + 2 * d * cfg.kv_heads * e


def _swiglu_params(d: int, width: int) -> int:
    return 3 * d * width


def _pool_params(cfg: ModelConfig) -> int:
    """One expert pool: every routed expert of one layer (layerwise) or group (UniPool)."""
    return count_params(cfg).expert // cfg.num_pools if cfg.num_pools else 0


def _largest_expert_tensor(cfg: ModelConfig) -> int:
    """The biggest single expert weight, an expert set's fused w13 (n, D, 2F), counting the
    set's default expert if it has one: its gradient is produced whole by one grouped GEMM."""
    extra = int(cfg.moe.overflow == "default_expert")
    sizes = ((s.num_experts + extra) * cfg.d_model * 2 * cfg.expert_width(s.granularity) for s in cfg.moe.experts)
    return max(sizes, default=0)


def _block_params(cfg: ModelConfig) -> list[int]:
    """Parameters of each decoder block as an FSDP unit: attention, norms, its dense FFN or its
    shared experts, and (layerwise) its own pool, sharded together with it."""
    moe_layers = set(cfg.moe_layers)
    own_pool = _pool_params(cfg) if cfg.moe.layout == "layerwise" else 0
    base = _attention_params(cfg) + 2 * cfg.d_model
    dense = _swiglu_params(cfg.d_model, cfg.d_ff)
    moe = _swiglu_params(cfg.d_model, cfg.shared_width) + own_pool
    return [base + (moe if layer in moe_layers else dense) for layer in range(cfg.n_layers)]


def _shared_pools_params(cfg: ModelConfig) -> int:
    """UniPool pools: each serves several layers, so it is its own unit and stays unsharded (and
    cast) from its first use in the forward to its last in the backward."""
    return cfg.num_pools * _pool_params(cfg) if cfg.moe.layout == "unipool" else 0


def _root_params(cfg: ModelConfig) -> int:
    """What no block owns: embeddings, head, final norm and the routers (PathMoE shares them).
    FSDP2 does not reshard the root after the forward, so it is unsharded all step."""
    return count_params(cfg).total - sum(_block_params(cfg)) - _shared_pools_params(cfg)


def _cast_params(cfg: ModelConfig) -> int:
    """Parameters copied to the compute dtype and kept until the backward: every matmul weight,
    not the input embedding (a lookup), norms or routers (float32). Linear weights stay in
    autocast's cache until the micro-batch's autocast region ends; each pool is cast once per
    forward (`ExpertPool.cast`) and the copy is saved by the layers that use it, also under
    checkpointing, where the copy is an input of every block that recomputes with it."""
    counts = count_params(cfg)
    input_embedding = counts.embedding - cfg.vocab_size * cfg.d_model
    norms = (2 * cfg.n_layers + 1) * cfg.d_model
    return counts.total - input_embedding - norms - counts.router


# -- activations -------------------------------------------------------------------------------


def _attention_bytes(cfg: ModelConfig, p: DtypePolicy) -> int:
    """Saved per token by one attention half-block: the residual input and rstd (RMSNorm), the
    normed input (autocast makes a separate cast for wq and for wkv), rotated q and k, the k|v
    projection (v is a view of it), the attention output and its logsumexp."""
    d, dkv, c = cfg.d_model, cfg.kv_heads * cfg.head_dim, p.compute_bytes
    normed = (2 if p.autocast else 1) * c * d
    return p.param_bytes * d + FP32 + normed + c * (d + 3 * dkv) + c * d + FP32 * cfg.n_heads


def _swiglu_bytes(width: int, p: DtypePolicy) -> int:
    """Saved per token by a SwiGLU of `width`: the gate|up projection, silu(gate), their product."""
    return 4 * p.compute_bytes * width


def _dense_ffn_bytes(cfg: ModelConfig, p: DtypePolicy) -> int:
    """The residual input and rstd (RMSNorm), the normed input as w13 saves it, the SwiGLU."""
    return (p.param_bytes + p.compute_bytes) * cfg.d_model + FP32 + _swiglu_bytes(cfg.d_ff, p)


def _moe_ffn_bytes(cfg: ModelConfig, p: DtypePolicy) -> int:
    """The residual input and rstd, the normed input in float32 (the router's matmul saves it),
    the shared experts, routing buffers (logits, scores and one derived (T, N) float32 tensor;
    ids and gates) and, per (token, slot) pair, the gathered input row, the (2F) hidden
    pre-activation, the gated (F) activation, the pair's gate and three int64 index maps."""
    d, c = cfg.d_model, p.compute_bytes
    shared = 0
    if cfg.shared_width:
        shared = (c * d if p.autocast else 0) + _swiglu_bytes(cfg.shared_width, p)
    routing = 3 * FP32 * cfg.moe.num_routed_experts + (INDEX + FP32) * cfg.moe.top_k
    pairs = sum(s.top_k * (c * d + 3 * c * cfg.expert_width(s.granularity) + c + 3 * INDEX) for s in cfg.moe.experts)
    return p.param_bytes * d + FP32 + FP32 * d + shared + routing + pairs


def _block_bytes(cfg: ModelConfig, p: DtypePolicy) -> list[int]:
    """Per token, what each decoder block saves for its backward."""
    attn, dense, moe = _attention_bytes(cfg, p), _dense_ffn_bytes(cfg, p), _moe_ffn_bytes(cfg, p)
    moe_layers = set(cfg.moe_layers)
    return [attn + (moe if layer in moe_layers else dense) for layer in range(cfg.n_layers)]


def _head_bytes(cfg: ModelConfig, p: DtypePolicy) -> int:
    """Per token: the final norm's input and rstd, the head's input, the logits (kept by the
    model's output until the next micro-batch) and the float32 log-softmax the loss saves."""
    d, v, c = cfg.d_model, cfg.vocab_size, p.compute_bytes
    return (p.param_bytes + c) * d + FP32 + (c + FP32) * v


def activation_bytes(cfg: ModelConfig, micro_batch_size: int, p: DtypePolicy, checkpointing: bool = False) -> int:
    """Bytes saved for backward by one micro-batch. With per-block activation checkpointing a
    block keeps only its input; the block being recomputed in the backward holds all of its own."""
    tokens = micro_batch_size * cfg.seq_len
    blocks = _block_bytes(cfg, p)
    if checkpointing:
        kept = cfg.n_layers * p.param_bytes * cfg.d_model + max(blocks)
    else:
        kept = sum(blocks)
    return tokens * (kept + _head_bytes(cfg, p))


def _layer_grad_width(cfg: ModelConfig) -> int:
    """Per token, the widest activation gradients one FFN's backward holds at once: those of its
    (2F) hidden pre-activation and of its (D) input, per (token, slot) pair for an expert set."""
    widths = [s.top_k * (2 * cfg.expert_width(s.granularity) + cfg.d_model) for s in cfg.moe.experts]
    if len(cfg.moe_layers) < cfg.n_layers:
        widths.append(2 * cfg.d_ff + cfg.d_model)
    return max(widths)


def _backward_peak(cfg: ModelConfig, tokens: int, p: DtypePolicy, sharding: Sharding) -> int:
    """The larger of the backward's two big working sets (they never overlap in time):
    - the loss: the float32 gradients of the log-probabilities and of the logits (2 x T x V);
    - a layer's weight gradients: one expert weight's (the grouped GEMM's output and the copy
      that zeroes empty experts, or under autocast that copy and its cast to the parameters'
      dtype), the gradients that collect over many layers (a UniPool pool's: autograd sums them
      in one buffer until its last layer; under fsdp also the root's and a block's unsharded
      ones with a reduce-scatter copy, in the compute dtype), and the layer's activation
      gradients. The log-softmax saved for the loss is already free then: not subtracted, so
      this errs high."""
    c, tensor = p.compute_bytes, _largest_expert_tensor(cfg)
    loss = 2 * FP32 * tokens * cfg.vocab_size
    layer = c * tokens * _layer_grad_width(cfg)
    if sharding == "fsdp":
        block_and_reduce_copy = 2 * max(_block_params(cfg))
        collecting = c * (_root_params(cfg) + _shared_pools_params(cfg) + block_and_reduce_copy)
        weight = 2 * c * tensor
    else:
        collecting = p.grad_bytes * _shared_pools_params(cfg)
        weight = (c + (p.grad_bytes if p.autocast else c)) * tensor
    return max(loss, collecting + weight + layer)


def _fsdp_gathered(cfg: ModelConfig, p: DtypePolicy) -> int:
    """Unsharded compute-dtype parameters under fsdp: the root and UniPool pools for the whole
    step, and the largest block twice (the one computing and the one prefetched)."""
    units = _root_params(cfg) + _shared_pools_params(cfg) + FSDP_BLOCKS_IN_FLIGHT * max(_block_params(cfg))
    return p.compute_bytes * units


def estimate_memory(
    model: ModelConfig,
    train: TrainConfig,
    *,
    workers: int = 1,
    sharding: Sharding = "none",
    checkpointing: bool = False,
    policy: DtypePolicy | None = None,
) -> MemoryEstimate:
    """Peak bytes per GPU for training `model` with `train`'s micro-batch on `workers` workers."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if sharding not in ("none", "fsdp"):
        raise ValueError(f"sharding must be none or fsdp, got {sharding!r}")
    p = policy or trainer_policy(train)
    params = count_params(model).total
    shard = -(-params // workers) if sharding == "fsdp" else params
    if sharding == "fsdp":
        compute_weights = _fsdp_gathered(model, p)
    else:
        compute_weights = p.compute_bytes * _cast_params(model) if p.autocast else 0
    return MemoryEstimate(
        weights=p.param_bytes * shard,
        gradients=p.grad_bytes * shard,
        optimizer_states=p.optimizer_bytes * shard,
        compute_weights=compute_weights,
        activations=activation_bytes(model, train.micro_batch_size, p, checkpointing),
        backward_peak=_backward_peak(model, train.micro_batch_size * model.seq_len, p, sharding),
        sharding=sharding,
        workers=workers,
        checkpointing=checkpointing,
    )


# -- fitting -----------------------------------------------------------------------------------


def usable_bytes(device_bytes: int, headroom: float = DEFAULT_HEADROOM) -> int:
    """What an estimate may use of a device of `device_bytes`: minus `headroom` (a share, for the
    allocator's fragmentation) and `CONTEXT_BYTES` (CUDA context and NCCL, never counted)."""
    return int(device_bytes * (1 - headroom)) - CONTEXT_BYTES


def fits(estimate: MemoryEstimate, device_bytes: int, headroom: float = DEFAULT_HEADROOM) -> bool:
    return estimate.total <= usable_bytes(device_bytes, headroom)


@dataclass(frozen=True)
class ShardingChoice:
    """The smallest sharding that fits, or `sharding` None and a reason to skip the trial."""

    sharding: Sharding | None
    estimate: MemoryEstimate  # of the choice, or of the best that was allowed when none fits
    reason: str

    @property
    def fits(self) -> bool:
        return self.sharding is not None


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def _setup(sharding: Sharding, workers: int) -> str:
    """As reasons say it: 1 worker, DDP over 4 workers, fsdp over 2 workers."""
    if workers == 1 and sharding == "none":
        return "1 worker"
    return f"{'DDP' if sharding == 'none' else 'fsdp'} over {workers} worker{'s' if workers > 1 else ''}"


def choose_sharding(
    model: ModelConfig,
    train: TrainConfig,
    *,
    workers: int,
    mode: ShardingMode,
    device_bytes: int,
    checkpointing: bool = False,
    headroom: float = DEFAULT_HEADROOM,
    policy: DtypePolicy | None = None,
) -> ShardingChoice:
    """`none` if allowed and it fits, else `fsdp` if allowed (more than one worker) and it fits.
    Otherwise no choice, and a reason: what the best allowed setup needs, and the fewest workers
    (these, or a power of two) fsdp would fit over, e.g. "needs 92.4 GB per GPU with 1 worker
    (75.9 GB usable); fits with fsdp over 2". Planner-agnostic: configs, counts and bytes in."""
    if mode not in ("auto", "none", "fsdp"):
        raise ValueError(f"sharding mode must be auto, none or fsdp, got {mode!r}")

    def estimate(sharding: Sharding, n: int) -> MemoryEstimate:
        return estimate_memory(model, train, workers=n, sharding=sharding, checkpointing=checkpointing, policy=policy)

    allowed: list[Sharding] = ["none", "fsdp"] if mode == "auto" else [mode]
    if mode == "auto" and workers == 1:
        allowed = ["none"]  # fsdp over one worker shards nothing and adds the unsharded copies
    tried = [estimate(s, workers) for s in allowed]
    for est in tried:
        if fits(est, device_bytes, headroom):
            return ShardingChoice(est.sharding, est, f"{_gb(est.total)} per GPU with {_setup(est.sharding, workers)}")
    best = min(tried, key=lambda e: e.total)
    usable = usable_bytes(device_bytes, headroom)
    need = f"needs {_gb(best.total)} per GPU with {_setup(best.sharding, workers)} ({_gb(usable)} usable)"
    candidates = [workers, *(n for n in SUGGESTED_WORKERS if n > workers)]
    enough = next((n for n in candidates if fits(estimate("fsdp", n), device_bytes, headroom)), None)
    if enough is not None:
        return ShardingChoice(None, best, f"{need}; fits with fsdp over {enough}")
    most = candidates[-1]
    floor = estimate("fsdp", most).total
    return ShardingChoice(None, best, f"{need}; fits nowhere: fsdp over {most} still needs {_gb(floor)}")
