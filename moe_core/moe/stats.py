"""Routing statistics from the detached records of one forward pass.

Recording is always on and costs a few small tensors per layer (the chosen ids and the counts the
dispatch computes anyway); turning records into numbers here syncs with the device, so the trainer
calls it only when it logs.

Reported per MoE layer: pairs per expert, max / mean load (1.0 is perfect balance), dropped
fraction (pairs over capacity that no expert computes), default fraction (pairs over capacity
the default expert computes, with `overflow: default_expert`; the two add up to the share over
capacity), mean per-token routing entropy (nats), silent fraction (tokens whose chosen experts
all score 0, NormRouter only), dead experts (no pair this batch). For shared
pools (UniPool): how much of the pool the layers use and how many distinct experts a token meets
across layers. For path analysis (PathMoE): the top-1 expert sequence of a few tokens, and the
Jaccard overlap of each token's expert set between consecutive MoE layers.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from moe_core.config import ModelConfig
from moe_core.moe.parts import LayerRouting


def _expected_load(cfg: ModelConfig, num_tokens: int) -> list[float]:
    """Pairs each expert gets under perfect balance: T * k_s / n_s for the experts of set s."""
    return [num_tokens * s.top_k / s.num_experts for s in cfg.moe.experts for _ in range(s.num_experts)]


def _jaccard(a_TK: torch.Tensor, b_TK: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of |A & B| / |A | B| for the two layers' expert-id sets (ids unique per row)."""
    inter = (a_TK[:, :, None] == b_TK[:, None, :]).any(dim=-1).sum(dim=-1).float()
    union = a_TK.shape[1] + b_TK.shape[1] - inter
    return (inter / union).mean()


def _unique_per_row(ids_TX: torch.Tensor) -> torch.Tensor:
    s = ids_TX.sort(dim=-1).values
    return 1 + (s[:, 1:] != s[:, :-1]).sum(dim=-1)


def _to_host(tensors: list[torch.Tensor]) -> list[list[float]]:
    """Every tensor's values as a flat list, in one device-to-host transfer (float64 holds the
    counts and ids exactly)."""
    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).cpu().tolist()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()])
        start += t.numel()
    return out


def summarize_routing(records: list[LayerRouting], cfg: ModelConfig, path_tokens: int = 16) -> dict[str, Any]:
    """Routing statistics of one forward's records. Everything is reduced on the device and read
    back in a single transfer, however many layers there are."""
    if not records:
        return {}
    by_pool: dict[int, list[LayerRouting]] = defaultdict(list)
    for r in records:
        by_pool[r.pool].append(r)
    pools = sorted(by_pool.items()) if cfg.moe.layout == "unipool" else []
    device_values = (
        [r.routed_N for r in records]
        + [torch.stack([r.kept_N.sum() for r in records]), torch.stack([r.default_pairs for r in records])]
        + [torch.stack([r.entropy.float() for r in records])]
        + [torch.stack([r.silent.float() for r in records])]
        + [torch.stack([_jaccard(a.ids_TK, b.ids_TK) for a, b in zip(records, records[1:])] or [records[0].entropy.new_zeros(())])]
        + [torch.stack([r.ids_TK[:path_tokens, 0] for r in records], dim=1)]
        + [torch.stack([(r.routed_N > 0) for r in recs]).sum(dim=0) for _, recs in pools]
        + [_unique_per_row(torch.cat([r.ids_TK for r in recs], dim=-1)).float().mean() for _, recs in pools]
    )
    host = _to_host(device_values)
    n = len(records)
    routed, (kept, defaulted, entropy, silent, jaccard, top1) = host[:n], host[n : n + 6]
    used_by, unique = host[n + 6 : n + 6 + len(pools)], host[n + 6 + len(pools) :]
    jaccard = jaccard if len(records) > 1 else []
    layers = []
    for i, r in enumerate(records):
        total_pairs = sum(routed[i])
        layers.append(
            {
                "layer": r.layer,
                "pool": r.pool,
                "tokens_per_expert": [int(c) for c in routed[i]],
                "max_load": max(c / e for c, e in zip(routed[i], _expected_load(cfg, r.num_tokens))),
                "dropped_fraction": 1.0 - (kept[i] + defaulted[i]) / max(total_pairs, 1),
                "default_fraction": defaulted[i] / max(total_pairs, 1),
                "entropy": entropy[i],
                "silent_fraction": silent[i],
                "dead_experts": sum(c == 0 for c in routed[i]),
            }
        )
    width = len(records)
    out: dict[str, Any] = {
        "layers": layers,
        "paths": {"top1": [[int(v) for v in top1[t : t + width]] for t in range(0, len(top1), width)], "jaccard": jaccard},
        "summary": {
            "max_load": sum(x["max_load"] for x in layers) / len(layers),
            "dropped_fraction": sum(x["dropped_fraction"] for x in layers) / len(layers),
            "default_fraction": sum(x["default_fraction"] for x in layers) / len(layers),
            "entropy": sum(x["entropy"] for x in layers) / len(layers),
            "silent_fraction": sum(x["silent_fraction"] for x in layers) / len(layers),
            "dead_experts": sum(x["dead_experts"] for x in layers),
            "jaccard": sum(jaccard) / len(jaccard) if jaccard else float("nan"),
        },
    }
    if cfg.moe.layout == "unipool":
        out["pools"] = [
            {
                "pool": pid,
                "layers": [r.layer for r in recs],
                "used_fraction": sum(u > 0 for u in used) / len(used),
                "layers_per_expert": sum(used) / len(used),
                "unique_experts_per_token": uniq[0],
            }
            for (pid, recs), used, uniq in zip(pools, used_by, unique)
        ]
    return out
