"""The decoder every trial trains: LLaMA-style blocks whose FFNs are dense or MoE.

Shape legend: B batch, S sequence, D model dim, V vocabulary.

MoE layouts (see `MoEConfig`):
- layerwise: MoE layer i has pool i (vanilla MoE);
- unipool: MoE layer i draws from pool i // G, G = pool_group_size (all layers by default);
and, for either, MoE layer i is scored by router i // B (PathMoE; B = 1 is independent routing).
Pools and routers live in `model.pools` / `model.routers`, so a shared one has a single storage
and sums the gradients of every layer that uses it; `model.parts` (`moe/parts.py`) hands each
layer its router and its pool's weights, cast once per forward, collects the layers' routing
records and turns them into the balance terms the forward adds to the loss.

A block calls its FFN the same way whether it is dense or MoE: `x + ffn(norm(x))`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_core.config import ModelConfig
from moe_core.errors import ConfigError
from moe_core.layers import Attention, Rotary, SwiGLU
from moe_core.moe.layer import MoEFFN, ProbeSpec
from moe_core.moe.parts import ExpertPool, LayerRouting, MoEParts
from moe_core.moe.router import Router
from moe_core.moe.stats import summarize_routing


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, S, V)
    loss: torch.Tensor | None = None  # what to backpropagate: ce + every balance term
    ce: torch.Tensor | None = None  # next-token cross-entropy, nats
    balance: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted aux / z / pool terms


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary, ffn: nn.Module) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, rotary)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = ffn
        self.checkpointed = False  # recompute the activations in the backward (`set_activation_checkpointing`)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(self._forward, x_BSD, use_reentrant=False, context_fn=self._rewind_counters)
        return self._forward(x_BSD)

    def _rewind_counters(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """Checkpoint contexts for the forward and its recomputation. A MoE layer counts its loads
        in its forward: the recomputation starts from the counters the forward started from, so it
        sees the same global-batch loads (hence the same aux loss), and leaves them as the forward
        left them, however far it runs (checkpointing stops it once it has what it needs)."""
        buffers = list(self.ffn.buffers())
        before: list[torch.Tensor] = []

        @contextmanager
        def remember():
            before[:] = [b.clone() for b in buffers]
            yield

        @contextmanager
        def rewind():
            after = [b.clone() for b in buffers]
            for b, v in zip(buffers, before):
                b.copy_(v)
            try:
                yield
            finally:
                for b, v in zip(buffers, after):
                    b.copy_(v)

        return remember(), rewind()

    def _forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        moe = cfg.moe
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        rotary = Rotary(cfg.head_dim, cfg.seq_len, cfg.rope_base)
        moe_index = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        group = (moe.pool_group_size or len(moe_index)) if moe.layout == "unipool" else 1
        pools = nn.ModuleList(ExpertPool(cfg) for _ in range(cfg.num_pools))
        routers = nn.ModuleList(
            Router(cfg.d_model, tuple((s.num_experts, s.top_k) for s in moe.experts), moe.router)
            for _ in range(cfg.num_routers)
        )
        self.parts = MoEParts(pools, routers, {layer: i // group for layer, i in moe_index.items()}, moe)
        blocks, moe_layers = [], []
        for layer in range(cfg.n_layers):
            if layer in moe_index:
                i = moe_index[layer]
                ffn = MoEFFN(cfg, layer, pool=i // group, router=i // moe.router.block_size, parts=self.parts)
                moe_layers.append(ffn)
            else:
                ffn = SwiGLU(cfg.d_model, cfg.d_ff)
            blocks.append(Block(cfg, rotary, ffn))
        # Registered in this order (blocks, pools, routers): `reset_parameters` draws in it.
        self.blocks = nn.ModuleList(blocks)
        self.pools, self.routers = pools, routers
        self.moe_layers: tuple[MoEFFN, ...] = tuple(moe_layers)  # a tuple: not registered twice
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Matrices ~ N(0, init_std); norm gains and NormRouter's sigma start at 1."""
        for p in self.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, self.cfg.init_std)
            else:
                p.fill_(1.0)

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None) -> ModelOutput:
        x_BSD = self.embed(idx_BS)
        self.parts.begin()
        for block in self.blocks:
            x_BSD = block(x_BSD)
        records = self.parts.end()
        x_BSD = self.norm(x_BSD)
        logits = F.linear(x_BSD, self.embed.weight) if self.head is None else self.head(x_BSD)
        out = ModelOutput(logits=logits, balance=self.parts.balance_terms(records))
        if targets_BS is not None:
            out.ce = F.cross_entropy(logits.float().flatten(0, 1), targets_BS.flatten())
            out.loss = out.ce + sum(out.balance.values(), torch.zeros((), device=logits.device))
        return out

    @property
    def last_routing(self) -> list[LayerRouting]:
        """The latest forward's routing records, detached (`MoEParts.end`)."""
        return self.parts.last_routing

    @torch.no_grad()
    def finish_step(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Call after every optimizer step: updates loss-free biases and resets step loads.

        `reduce` (data parallelism: an in-place all-reduce sum) first makes every worker's step
        loads the global ones, so all workers move their biases the same way.
        """
        for ffn in self.moe_layers:
            if reduce is not None:
                reduce(ffn.step_counts_N)
                reduce(ffn.step_tokens)
            ffn.finish_step()

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Keep only each block's input for the backward and recompute the rest there
        (non-reentrant `torch.utils.checkpoint`): the same loss and gradients, less memory."""
        for block in self.blocks:
            block.checkpointed = enabled

    def set_count_reducer(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Data parallelism: sum the global-batch balance loss's load counts over workers."""
        for ffn in self.moe_layers:
            ffn.count_reducer = reduce

    def set_routing_probe(self, layers: Iterable[int] | None, candidates: str = "pool", seed: int = 0) -> None:
        """Route the given layers (model layer indices) to uniform random experts at eval.

        `candidates`: "pool" draws from the whole expert set, "top8" from the layer's 8 most-used
        experts in training. `None` turns the probe off everywhere.
        """
        if candidates not in ("pool", "top8"):
            raise ConfigError(f"routing probe candidates '{candidates}' is not one of: pool, top8")
        wanted = set(layers or ())
        by_layer = {ffn.layer: ffn for ffn in self.moe_layers}
        unknown = wanted - by_layer.keys()
        if unknown:
            raise ConfigError(f"routing probe layers {sorted(unknown)} are not MoE layers; MoE layers are {sorted(by_layer)}")
        for layer, ffn in by_layer.items():
            ffn.probe = ProbeSpec(candidates, seed) if layer in wanted else None

    def routing_stats(self, path_tokens: int = 16) -> dict:
        """Routing statistics of the latest forward, as plain numbers (see `moe.stats`)."""
        return summarize_routing(self.last_routing, self.cfg, path_tokens=path_tokens)


def build_model(cfg: ModelConfig) -> MoETransformer:
    return MoETransformer(cfg)
