"""Routing statistics from the detached records of one forward pass.

Recording is always on and costs a few small tensors per layer (the chosen ids and the counts the
dispatch computes anyway); turning records into numbers here syncs with the device, so the trainer
calls it only when it logs.

Reported per MoE layer: pairs per expert, max / mean load (1.0 is perfect balance), dropped
fraction, mean per-token routing entropy (nats), dead experts (no pair this batch). For shared
pools (UniPool): how much of the pool the layers use and how many distinct experts a token meets
across layers. For path analysis (PathMoE): the top-1 expert sequence of a few tokens, and the
Jaccard overlap of each token's expert set between consecutive MoE layers.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from moe_core.config import ModelConfig
from moe_core.moe.layer import LayerRouting


def _expected_load(cfg: ModelConfig, num_tokens: int) -> torch.Tensor:
    """Pairs each expert gets under perfect balance: T * k_s / n_s for the experts of set s."""
    return torch.cat([torch.full((s.num_experts,), num_tokens * s.top_k / s.num_experts) for s in cfg.moe.experts])


def _jaccard(a_TK: torch.Tensor, b_TK: torch.Tensor) -> float:
    """Mean over tokens of |A & B| / |A | B| for the two layers' expert-id sets (ids unique per row)."""
    inter = (a_TK[:, :, None] == b_TK[:, None, :]).any(dim=-1).sum(dim=-1).float()
    union = a_TK.shape[1] + b_TK.shape[1] - inter
    return float((inter / union).mean())


def _unique_per_row(ids_TX: torch.Tensor) -> torch.Tensor:
    s = ids_TX.sort(dim=-1).values
    return 1 + (s[:, 1:] != s[:, :-1]).sum(dim=-1)


def summarize_routing(records: list[LayerRouting], cfg: ModelConfig, path_tokens: int = 16) -> dict[str, Any]:
    if not records:
        return {}
    layers = []
    for r in records:
        load = r.routed_N.cpu().float() / _expected_load(cfg, r.num_tokens)
        total_pairs = int(r.routed_N.sum())
        layers.append(
            {
                "layer": r.layer,
                "pool": r.pool,
                "tokens_per_expert": r.routed_N.cpu().tolist(),
                "max_load": float(load.max()),
                "dropped_fraction": 1.0 - int(r.kept_N.sum()) / max(total_pairs, 1),
                "entropy": float(r.entropy),
                "dead_experts": int((r.routed_N == 0).sum()),
            }
        )
    jaccard = [_jaccard(a.ids_TK, b.ids_TK) for a, b in zip(records, records[1:])]
    out: dict[str, Any] = {
        "layers": layers,
        "paths": {
            "top1": torch.stack([r.ids_TK[:path_tokens, 0] for r in records], dim=1).cpu().tolist(),
            "jaccard": jaccard,
        },
        "summary": {
            "max_load": sum(x["max_load"] for x in layers) / len(layers),
            "dropped_fraction": sum(x["dropped_fraction"] for x in layers) / len(layers),
            "entropy": sum(x["entropy"] for x in layers) / len(layers),
            "dead_experts": sum(x["dead_experts"] for x in layers),
            "jaccard": sum(jaccard) / len(jaccard) if jaccard else float("nan"),
        },
    }
    if cfg.moe.layout == "unipool":
        out["pools"] = _pool_stats(records)
    return out


def _pool_stats(records: list[LayerRouting]) -> list[dict[str, Any]]:
    by_pool: dict[int, list[LayerRouting]] = defaultdict(list)
    for r in records:
        by_pool[r.pool].append(r)
    pools = []
    for pid, recs in sorted(by_pool.items()):
        used_by = torch.stack([(r.routed_N > 0) for r in recs]).sum(dim=0).cpu()
        ids = torch.cat([r.ids_TK for r in recs], dim=-1)
        pools.append(
            {
                "pool": pid,
                "layers": [r.layer for r in recs],
                "used_fraction": float((used_by > 0).float().mean()),
                "layers_per_expert": float(used_by.float().mean()),
                "unique_experts_per_token": float(_unique_per_row(ids).float().mean()),
            }
        )
    return pools
