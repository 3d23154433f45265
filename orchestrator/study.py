"""The study's knobs, and how they become a FLOP-matched MoE config.

A sweep may describe its MoE by the design study's quantities instead of expert counts:
activation sparsity S = n / k, granularity g = expert width / dense d_ff, shared-expert count and
size, heterogeneous expert sets, UniPool's pool fraction and group size, PathMoE's router block
size B. `derive_moe` turns them into `model.moe` keys such that the active FFN width equals the
dense d_ff exactly (sum over routed sets of k_i * g_i plus K_s * g_s = 1). What cannot be matched
exactly raises `Infeasible` with the reason; the planner lists such trials as skipped rather than
changing them silently.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from moe_core.config import Granularity, StrictConfig, UnitFraction



class Infeasible(Exception):
    """A combination of knobs that has no exactly FLOP-matched model; the message says why."""


def _fraction(value: float) -> Fraction:
    # Granularities and fractions arrive as floats (1/3 -> 0.333...): recover the small fraction
    # the user wrote so that k = 1 / g is tested for integrality exactly, not to within rounding.
    return Fraction(value).limit_denominator(4096)


class ExpertSetKnobs(StrictConfig):
    """One routed set of a heterogeneous layer: its granularity and its share of the routed width."""

    granularity: Granularity
    share: UnitFraction


class StudyConfig(StrictConfig):
    layout: Literal["dense", "layerwise", "unipool"] = "layerwise"
    sparsity: Annotated[float, Field(ge=1)] = 1.0  # S = n / k
    granularity: Granularity = 1.0  # g
    shared_experts: Annotated[int, Field(ge=0)] = 0  # K_s always-on experts
    shared_granularity: Granularity | None = None  # g_s; default g
    # With shared experts, what stays equal to the plain MoE of sparsity S: `sparsity` keeps
    # n = S k for the routed experts (the shared width then leaves the total: fewer parameters);
    # `total` raises the routed count so that routed plus shared expert parameters equal the plain
    # MoE's (n g + K_s g_s = S), the comparison at matched total parameters.
    shared_match: Literal["sparsity", "total"] = "sparsity"
    expert_sets: tuple[ExpertSetKnobs, ...] = ()  # heterogeneous sets (replace `granularity`)
    pool_fraction: UnitFraction = 1.0  # UniPool: pool size / vanilla expert budget
    pool_group_size: Annotated[int, Field(ge=1)] | None = None  # UniPool G (None: one pool)
    block_size: Annotated[int, Field(ge=1)] | Literal["all"] | None = None  # PathMoE B; "all" = one router

    @model_validator(mode="after")
    def _check(self) -> "StudyConfig":
        if self.expert_sets and abs(sum(s.share for s in self.expert_sets) - 1) > 1e-9:
            raise ValueError("expert_sets shares must sum to 1")
        if self.layout != "unipool" and (self.pool_fraction != 1.0 or self.pool_group_size is not None):
            raise ValueError("pool_fraction and pool_group_size need layout 'unipool'")
        return self


def _whole(value: Fraction, what: str) -> int:
    if value.denominator != 1:
        raise Infeasible(f"{what} = {float(value):g} is not a whole number")
    return int(value)


def derive_moe(study: StudyConfig, moe: dict[str, Any], d_ff: int, n_layers: int, alignment: int) -> dict[str, Any]:
    """`model.moe` keys for `study` on a model of dense width `d_ff` and `n_layers` layers.

    `moe` holds the user's other MoE keys (router, balance, capacity, ...), kept as given; the
    expert layout is derived. Expert widths must be multiples of `alignment`.
    """
    if study.layout == "dense":
        return {"layout": "dense"}  # routing and balancing keys mean nothing for a dense model
    for key in ("experts", "shared_experts", "shared_granularity", "pool_group_size"):
        if key in moe:
            raise Infeasible(f"model.moe.{key} is derived from study knobs; do not give both")
    g_shared = _fraction(study.shared_granularity if study.shared_granularity is not None else study.granularity)
    budget = 1 - study.shared_experts * g_shared
    if budget <= 0:
        raise Infeasible(f"{study.shared_experts} shared experts of g = {g_shared} leave no routed width")
    knobs = study.expert_sets or (ExpertSetKnobs(granularity=study.granularity, share=1.0),)
    sparsity = _fraction(study.sparsity)
    routed_total = sparsity - study.shared_experts * g_shared  # shared_match total: routed width, in d_ff
    first = moe.get("first_dense_layers", 0)
    moe_layers = len(range(first, n_layers, moe.get("moe_every", 1)))
    group = study.pool_group_size or moe_layers
    experts = []
    for i, s in enumerate(knobs):
        g = _fraction(s.granularity)
        name = f"expert set {i}" if study.expert_sets else "routed experts"
        share = _fraction(s.share)
        k = _whole(share * budget / g, f"{name}: top_k = {float(share * budget):g} / g {g}")
        if study.shared_match == "sparsity":
            n = _whole(sparsity * k, f"{name}: num_experts = S {float(sparsity):g} * top_k {k}")
        else:
            n = _whole(share * routed_total / g, f"{name}: num_experts = {float(share * routed_total):g} / g {g} "
                       f"(S {float(sparsity):g} less the shared width, shared_match total)")
        _aligned(g * d_ff, alignment, f"{name}: width g * d_ff = {g} * {d_ff}")
        if study.layout == "unipool":
            pool = _whole(_fraction(study.pool_fraction) * n * group, f"{name}: pool size = {study.pool_fraction:g} * {n} * {group} layers")
            if pool < k:
                raise Infeasible(f"{name}: pool of {pool} experts is smaller than top_k {k}")
            n = pool
        experts.append({"num_experts": n, "top_k": k, "granularity": float(g)})
    if study.shared_experts:
        _aligned(g_shared * d_ff, alignment, f"shared expert width g_s * d_ff = {g_shared} * {d_ff}")
    out = {**moe, "layout": study.layout, "experts": experts, "shared_experts": study.shared_experts}
    if study.shared_experts:
        out["shared_granularity"] = float(g_shared)
    if study.layout == "unipool" and study.pool_group_size is not None:
        out["pool_group_size"] = study.pool_group_size
    if study.block_size is not None:
        block = moe_layers if study.block_size == "all" else study.block_size
        out["router"] = {**moe.get("router", {}), "block_size": block}
    return out


def _aligned(width: Fraction, alignment: int, what: str) -> None:
    w = _whole(width, what)
    if w % alignment:
        raise Infeasible(f"{what} = {w} is not a multiple of expert_alignment {alignment}")
