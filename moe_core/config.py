"""Typed, validated configuration of the model and its MoE layers.

Every config is a frozen pydantic model: unknown keys are refused, types are checked, and
cross-field rules are checked when the config is built. Any problem raises a one-line
`ConfigError` naming the key and what is allowed. `to_dict`/`from_dict` round-trip through plain
dicts (and so YAML), which is how the orchestrator plans and records trials.

Granularity follows the design study (Li et al. 2026): g = expert width / dense FFN width, so
g <= 1 means finer experts (Krajewski et al. 2024 use the inverse). Granularities may be written
as fractions ("1/8") in YAML.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from moe_core.errors import ConfigError


def _parse_fraction(value: Any) -> Any:
    """Accept "1/8" as well as 0.125: sweep authors think of granularity as a fraction."""
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{value!r} is not a number or a fraction like '1/8'") from None
    return value


Granularity = Annotated[float, BeforeValidator(_parse_fraction), Field(gt=0, le=1)]
UnitFraction = Granularity  # any share in (0, 1], written as 0.25 or "1/4"
PositiveInt = Annotated[int, Field(ge=1)]
LossWeight = Annotated[float, Field(ge=0, le=1)]


class StrictConfig(BaseModel):
    """Base of every config: frozen, no unknown keys, errors as one-line `ConfigError`s."""

    # allow_inf_nan: `lr: .inf` or `nan` in a YAML is a mistake, never a setting
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError.from_validation(err, type(self).__name__, type(self)) from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StrictConfig":
        """Build from a plain dict (e.g. parsed YAML); raises `ConfigError` on any problem."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError.from_validation(err, cls.__name__, cls) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-safe dict that `from_dict` turns back into an equal config."""
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> "StrictConfig":
        """A validated copy with some top-level fields changed."""
        return type(self).from_dict({**self.to_dict(), **_to_plain(changes)})


def _to_plain(changes: dict[str, Any]) -> dict[str, Any]:
    return {k: v.to_dict() if isinstance(v, StrictConfig) else v for k, v in changes.items()}


def integral(value: float, what: str) -> int:
    """`value` as an int, or a ValueError saying it is not whole (no silent rounding)."""
    rounded = round(value)
    if not math.isclose(value, rounded, rel_tol=0, abs_tol=1e-9 * max(1.0, abs(value))):
        raise ValueError(f"{what} = {value:g} is not a whole number")
    return int(rounded)


class ExpertSetConfig(StrictConfig):
    """One set of equally sized routed experts; a layer may hold several (heterogeneous MoE)."""

    num_experts: PositiveInt
    top_k: PositiveInt
    granularity: Granularity = 1.0

    @model_validator(mode="after")
    def _check(self) -> "ExpertSetConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        return self

    @classmethod
    def from_sparsity(cls, sparsity: float, granularity: float, active_fraction: float = 1.0) -> "ExpertSetConfig":
        """The study's parametrisation: k = active_fraction / g and n = S * k (so S = n / k).

        `active_fraction` is the share of the dense FFN width these experts must supply: 1 for a
        plain MoE, less when shared experts or other sets take part of the FLOP budget.
        """
        g = _parse_fraction(granularity)
        try:
            k = integral(active_fraction / g, f"top_k = {active_fraction:g} / granularity {g:g}")
            n = integral(sparsity * k, f"num_experts = sparsity {sparsity:g} * top_k {k}")
        except ValueError as err:
            raise ConfigError(f"ExpertSetConfig.from_sparsity: {err}") from None
        return cls(num_experts=n, top_k=k, granularity=g)


class RouterConfig(StrictConfig):
    """How a layer scores experts. Everything after the logits runs in float32."""

    scoring: Literal["softmax", "sigmoid", "norm"] = "softmax"
    renormalize: bool = False  # divide the chosen gates by their sum (Mixtral style)
    block_size: PositiveInt = 1  # PathMoE: MoE layer i uses router i // block_size
    norm_eps: Annotated[float, Field(gt=0, lt=1)] = 1e-8  # UniPool's NormRouter
    # The logits' matmul: `float32` (exact products) or `compute` (the autocast dtype, bf16 on
    # GPUs, as Mixtral/OLMoE and Megatron's default route; x's dtype without autocast). On a GPU
    # a float32 matmul runs on the CUDA cores, about a tenth of the tensor cores' rate, and the
    # router's FLOPs are n / (3 d_ff) of the experts' (a twelfth at n = 1,024, d_ff = 4,096): by
    # that estimate the float32 router then costs about what the experts do.
    dtype: Literal["float32", "compute"] = "float32"

    @model_validator(mode="after")
    def _check(self) -> "RouterConfig":
        if self.scoring == "norm" and self.renormalize:
            raise ValueError("renormalize must be false for scoring 'norm' (NormRouter's gate is the score itself)")
        return self


class BalanceConfig(StrictConfig):
    """Load-balancing terms; every weight may be 0. Defaults follow the OLMoE recipe."""

    # Weights and rates are at most 1: the papers' are 1e-4..1e-1; larger is a typo, not a setting.
    aux_weight: LossWeight = 0.01  # Switch loss alpha
    aux_scope: Literal["micro_batch", "global_batch"] = "micro_batch"
    pool_weight: LossWeight = 0.0  # UniPool pool-level loss alpha_pool
    z_weight: LossWeight = 0.001  # ST-MoE router z-loss
    bias_rate: LossWeight = 0.0  # loss-free balancing update rate u (DeepSeek-V3)


class MoEConfig(StrictConfig):
    """Which layers are MoE, their experts, routing and balancing."""

    layout: Literal["dense", "layerwise", "unipool"] = "dense"
    experts: tuple[ExpertSetConfig, ...] = ()
    shared_experts: Annotated[int, Field(ge=0)] = 0
    shared_granularity: Granularity = 1.0
    first_dense_layers: Annotated[int, Field(ge=0)] = 0
    moe_every: PositiveInt = 1
    pool_group_size: PositiveInt | None = None  # UniPool G: None means one pool for all layers
    capacity_factor: Annotated[float, Field(gt=0)] | None = None  # None means dropless
    # Pairs over capacity: "drop" (the residual carries them) or "default_expert" (each expert
    # set's pool holds one more expert of the set's width, which computes them, uncapped).
    overflow: Literal["drop", "default_expert"] = "drop"
    router: RouterConfig = RouterConfig()
    balance: BalanceConfig = BalanceConfig()
    backend: Literal["auto", "reference", "grouped", "streamed", "triton"] = "auto"  # see moe/experts.py

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if self.layout == "dense":
            if self.experts or self.shared_experts:
                raise ValueError("experts and shared_experts must be empty when layout is 'dense'")
        elif not self.experts:
            raise ValueError(f"layout '{self.layout}' needs at least one entry in experts")
        if self.layout != "unipool":
            if self.pool_group_size is not None:
                raise ValueError("pool_group_size is only allowed with layout 'unipool'")
            if self.balance.pool_weight > 0:
                raise ValueError("balance.pool_weight > 0 is only allowed with layout 'unipool'")
        if self.overflow == "default_expert" and self.capacity_factor is None:
            raise ValueError("overflow 'default_expert' needs capacity_factor: dropless routing never overflows")
        return self

    @property
    def is_moe(self) -> bool:
        return self.layout != "dense"

    @property
    def num_routed_experts(self) -> int:
        return sum(s.num_experts for s in self.experts)

    @property
    def top_k(self) -> int:
        return sum(s.top_k for s in self.experts)

    @property
    def active_fraction(self) -> float:
        """Active FFN width as a fraction of the dense d_ff; FLOP matching needs exactly 1."""
        return sum(s.top_k * s.granularity for s in self.experts) + self.shared_experts * self.shared_granularity


def study_moe(
    sparsity: float,
    granularity: float,
    *,
    shared_experts: int = 0,
    shared_granularity: float | None = None,
    **fields: Any,
) -> MoEConfig:
    """The study's FLOP-matched MoE: k * g + K_s * g_s = 1 and n = S * k.

    Shared experts (granularity defaults to `granularity`) take their width out of the routed
    budget, so the routed top-k shrinks. Non-integral k or n raise `ConfigError`.
    """
    g_shared = granularity if shared_granularity is None else shared_granularity
    budget = 1.0 - shared_experts * _parse_fraction(g_shared)
    if budget <= 0:
        raise ConfigError(f"study_moe: {shared_experts} shared experts of granularity {g_shared} leave no routed width")
    routed = ExpertSetConfig.from_sparsity(sparsity, granularity, active_fraction=budget)
    fields.setdefault("layout", "layerwise")
    return MoEConfig(experts=(routed,), shared_experts=shared_experts, shared_granularity=g_shared, **fields)


class ModelConfig(StrictConfig):
    """A LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, GQA) whose FFNs may be MoE."""

    vocab_size: Annotated[int, Field(ge=2)]
    d_model: PositiveInt
    n_layers: PositiveInt
    n_heads: PositiveInt
    n_kv_heads: PositiveInt | None = None  # None means n_heads (plain multi-head attention)
    d_ff: PositiveInt  # dense SwiGLU width; the unit of granularity
    seq_len: PositiveInt = 1024
    rope_base: Annotated[float, Field(gt=1)] = 10000.0
    tie_embeddings: bool = False
    init_std: Annotated[float, Field(gt=0, le=1)] = 0.02
    norm_eps: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    moe: MoEConfig = MoEConfig()

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head dim d_model / n_heads ({self.head_dim}) must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        for i, s in enumerate(self.moe.experts):
            integral(s.granularity * self.d_ff, f"moe.experts[{i}] width = granularity {s.granularity:g} * d_ff {self.d_ff}")
        if self.moe.shared_experts:
            integral(self.moe.shared_granularity * self.d_ff, f"shared expert width = {self.moe.shared_granularity:g} * d_ff {self.d_ff}")
        if self.moe.is_moe and not self.moe_layers:
            raise ValueError(f"moe.first_dense_layers ({self.moe.first_dense_layers}) leaves no MoE layer in {self.n_layers}")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of MoE layers: first_dense_layers, then every moe_every-th layer."""
        if not self.moe.is_moe:
            return ()
        return tuple(range(self.moe.first_dense_layers, self.n_layers, self.moe.moe_every))

    def expert_width(self, granularity: float) -> int:
        return integral(granularity * self.d_ff, "expert width")

    @property
    def shared_width(self) -> int:
        """Total width of the always-on experts (K_s experts act as one wider SwiGLU)."""
        return self.moe.shared_experts * self.expert_width(self.moe.shared_granularity) if self.moe.shared_experts else 0

    @property
    def num_routers(self) -> int:
        return math.ceil(len(self.moe_layers) / self.moe.router.block_size) if self.moe.is_moe else 0

    @property
    def num_pools(self) -> int:
        """Expert pools: one per MoE layer (layerwise), or one per group of G layers (UniPool)."""
        n = len(self.moe_layers)
        if self.moe.layout == "unipool":
            return math.ceil(n / (self.moe.pool_group_size or n))
        return n

    @property
    def sparsity(self) -> float:
        """Activation sparsity S = n / k of one MoE layer (1 for a dense model); a UniPool pool of
        M experts shared by G layers counts as M / G experts per layer."""
        k, n = self.moe.top_k, self.moe.num_routed_experts
        if not k:
            return 1.0
        if self.moe.layout == "unipool":
            return n * self.num_pools / len(self.moe_layers) / k
        return n / k
