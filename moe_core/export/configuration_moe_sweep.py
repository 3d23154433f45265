"""Configuration of a moe-sweep model exported to the Hugging Face format (remote code).

This file is copied next to the weights of every export that no class shipped with transformers
can express (see `modeling_moe_sweep.py`), so it depends on transformers alone, never on moe_core.

The MoE structure is spelled out per MoE layer instead of as the training config's knobs
(layout, pool group size, router block size): `layer_pools[i]` and `layer_routers[i]` name the
expert pool and the router that MoE layer `moe_layers[i]` uses, so UniPool (layers sharing a
pool) and PathMoE (layers sharing a router) are plain index lists here.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MoESweepConfig(PretrainedConfig):
    """A LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, GQA) whose FFNs may be MoE.

    MoE fields:
    - `moe_layers`: model layer indices whose FFN is MoE (the rest are dense SwiGLUs of
      `intermediate_size`);
    - `layer_pools`, `layer_routers`: per MoE layer, the index of its pool and of its router;
    - `expert_sets`: `{"num_experts", "top_k", "width"}` per set of equally sized experts; every
      pool holds one bank per set (with one extra, last, default expert when `overflow` is
      "default_expert");
    - `shared_expert_size`: width of the always-on SwiGLU of each MoE layer (0: none);
    - `router_scoring`: "softmax", "sigmoid" or "norm" (NormRouter); `router_renormalize`
      divides the chosen gates by their sum; `router_dtype`: the logits' matmul in "float32" or
      in the input's dtype ("compute", as the model was trained under autocast);
    - `selection_bias`: each MoE layer adds a fixed bias to the scores when choosing experts
      (loss-free balancing), never to the gates;
    - `capacity_factor`: None is dropless; else each expert takes at most
      ceil(CF * tokens * top_k / num_experts) pairs of a forward, and `overflow` says what happens
      to the rest ("drop", or "default_expert").
    """

    model_type = "moe_sweep"

    def __init__(
        self,
        vocab_size: int = 257,
        hidden_size: int = 64,
        intermediate_size: int = 256,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 1024,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        moe_layers: list[int] | None = None,
        layer_pools: list[int] | None = None,
        layer_routers: list[int] | None = None,
        expert_sets: list[dict[str, int]] | None = None,
        shared_expert_size: int = 0,
        router_scoring: str = "softmax",
        router_renormalize: bool = False,
        router_norm_eps: float = 1e-8,
        router_dtype: str = "float32",
        selection_bias: bool = False,
        capacity_factor: float | None = None,
        overflow: str = "drop",
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.moe_layers = list(moe_layers or [])
        self.layer_pools = list(layer_pools or [])
        self.layer_routers = list(layer_routers or [])
        self.expert_sets = [dict(s) for s in expert_sets or []]
        self.shared_expert_size = shared_expert_size
        self.router_scoring = router_scoring
        self.router_renormalize = router_renormalize
        self.router_norm_eps = router_norm_eps
        self.router_dtype = router_dtype
        self.selection_bias = selection_bias
        self.capacity_factor = capacity_factor
        self.overflow = overflow
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_pools(self) -> int:
        return max(self.layer_pools, default=-1) + 1

    @property
    def num_routers(self) -> int:
        return max(self.layer_routers, default=-1) + 1
