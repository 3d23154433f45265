"""Load-balancing terms: Switch loss, UniPool pool loss, router z-loss, loss-free bias update.

Shape legend: T tokens, N routed experts (all sets of a layer or pool).

With several expert sets (heterogeneous MoE) each set is balanced on its own, since a uniform
load means something different for sets of different (n, k): the Switch form
n_s * sum_{i in s} f_i * P_i is taken per set and averaged over sets, so a perfectly balanced
router gives exactly the loss weight, as in the homogeneous case.
"""

from __future__ import annotations

import torch

from moe_core.moe.router import SetSlice


def balance_probs(scores_TN: torch.Tensor, scoring: str, sets: tuple[SetSlice, ...]) -> torch.Tensor:
    """The per-token distribution P the balance losses average.

    Softmax: the probabilities, renormalised within each set. Sigmoid: scores normalised within
    each set (scores are independent). NormRouter: the scores themselves (UniPool, sec. 3).
    """
    if scoring == "norm":
        return scores_TN
    if scoring == "softmax" and len(sets) == 1:
        return scores_TN
    parts = [scores_TN[:, s.cols] for s in sets]
    return torch.cat([p / p.sum(dim=-1, keepdim=True).clamp_min(1e-20) for p in parts], dim=-1)


def load_fraction(counts_N: torch.Tensor, num_tokens: int | torch.Tensor, sets: tuple[SetSlice, ...]) -> torch.Tensor:
    """f_i = pairs routed to expert i / (T * k_s): each set's loads sum to 1 (detached)."""
    k = torch.cat([counts_N.new_full((s.num_experts,), s.top_k, dtype=torch.float32) for s in sets])
    return counts_N.detach().float() / (k * num_tokens)


def switch_loss(f_N: torch.Tensor, mean_p_N: torch.Tensor, sets: tuple[SetSlice, ...]) -> torch.Tensor:
    """n_s * sum_i f_i * P_i per set, averaged over sets (Fedus et al. 2021, eq. 4, unweighted)."""
    per_set = [s.num_experts * (f_N[s.cols] * mean_p_N[s.cols]).sum() for s in sets]
    return torch.stack(per_set).mean()


def z_loss(logits_TN: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (Zoph et al. 2022)."""
    return torch.logsumexp(logits_TN, dim=-1).square().mean()


@torch.no_grad()
def update_loss_free_bias(bias_N: torch.Tensor, counts_N: torch.Tensor, sets: tuple[SetSlice, ...], rate: float) -> None:
    """b_i += u * sign(mean load - load_i), in place, per set (Wang et al. 2024; DeepSeek-V3)."""
    for s in sets:
        load = counts_N[s.cols].float()
        bias_N[s.cols] += rate * torch.sign(load.mean() - load)
