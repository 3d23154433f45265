"""How `moe-sweep plan` shows plans: rich tables for people, one JSON object for programs."""

from __future__ import annotations

import math
import re
from typing import Any

from rich.console import Console
from rich.table import Table

from moe_core.errors import ConfigError
from orchestrator.cluster_model import Job, best_queue, start_gaps
from orchestrator.planner import Plan


def _si(x: float) -> str:
    if not math.isfinite(x):
        return "?"
    for unit, scale in (("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _hours(h: float) -> str:
    if not math.isfinite(h):
        return "?"
    return f"{h * 60:.1f} min" if h < 1 else f"{h:,.1f} h"


def queue_schedule(plans: list[Plan], gpus: int, per_node: int) -> dict[str, Any]:
    """The wall time of all the plans' trials as one queue (in the order `moe-sweep run` would
    choose, gang placement) on `gpus` GPUs in nodes of `per_node`: list scheduling on the plan's
    estimates."""
    if gpus < 1 or per_node < 1 or gpus % per_node:
        raise ConfigError(f"--gpus ({gpus}) must be a positive multiple of --gpus-per-node ({per_node})")
    trials = [t for p in plans for t in p.trials if t.shape.gpus_per_worker]
    if not trials:
        raise ConfigError("--gpus: these sweeps plan no GPU trials (resources.gpus is 0)")
    widest = max(trials, key=lambda t: t.shape.gpus)
    if widest.shape.gpus > gpus:
        raise ConfigError(f"--gpus {gpus}: trial {widest.trial_id} ({widest.sweep}) is planned on {widest.shape.gpus:g} GPUs")
    jobs = [Job(t.est_hours, math.ceil(t.shape.gpus), True) for t in trials]
    order, _, s = best_queue(jobs, gpus // per_node, per_node, *start_gaps())
    return {"gpus": gpus, "gpus_per_node": per_node, "trials": len(jobs), "order": order, "wall_hours": s.makespan,
            "gpu_hours": s.gpu_hours,
            "bound_hours": s.bound, "utilisation": s.utilisation, "longest_hours": s.longest}


def print_plans(plans: list[Plan], console: Console, limit: int, cluster: dict[str, Any] | None = None) -> None:
    """Per sweep: up to `limit` trials, then skipped reasons; then totals over all sweeps."""
    for plan in plans:
        spec = plan.spec
        title = f"{spec.name} ({plan.path}): {spec.method}, {plan.planned_trials} trials ({_points(plan)})"
        table = Table(title=title, title_justify="left")
        numeric = ("active", "total", "GFLOP/tok", "tokens", "FLOPs", "GPUs", "est.", "mem/GPU")
        for col in ("trial_id", "scale", "seed", "params", "moe", *numeric):
            table.add_column(col, justify="right" if col in numeric else "left")
        rows = plan.trials if spec.method != "bayes" else ([plan.estimate] if plan.estimate else [])
        for t in rows[: max(limit, 0)]:
            d = t.derived
            moe = "dense" if d["layout"] == "dense" else f"{d['layout']} n={d['num_experts']} k={d['top_k']} w={d['expert_width']}"
            params = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in t.params.items())
            table.add_row(
                t.trial_id if spec.method != "bayes" else "(typical)", t.scale, str(t.seed), params, moe,
                _si(t.active_params), _si(t.total_params), f"{t.flops_per_token / 1e9:.3g}", _si(t.train_tokens),
                _si(t.train_flops), _devices(t), _hours(t.est_hours), _memory(t),
            )
        if len(rows) > limit > 0:
            table.caption = f"... {len(rows) - limit} more trials (--limit N to show more, --json for all)"
        if limit > 0:
            console.print(table)
        else:
            console.print(f"{title}{f', {len(plan.skipped)} skipped' if plan.skipped else ''}")
        if plan.largest is not None:
            console.print(f"  largest: {_memory(plan.largest)} per GPU ({plan.largest.trial_id}, {plan.largest.scale})")
        if spec.method == "bayes":
            space = ", ".join(f"{k}: {_space(p)}" for k, p in spec.parameters.items())
            console.print(f"  search space ({spec.sampler}): {space}")
        reasons: dict[str, list[str]] = {}  # reasons that differ only in numbers, grouped
        for s in plan.skipped:
            text = s.reason if not s.reason.startswith("same resolved trial") else "duplicate of another grid point"
            reasons.setdefault(re.sub(r"[0-9.]+", "#", text), []).append(text)
        for texts in reasons.values():
            console.print(f"  skipped {len(texts)}: {texts[0]}{' (and similar)' if len(set(texts)) > 1 else ''}")
    total = Table(title="totals", title_justify="left")
    for col in ("hardware", "sweeps", "configurations", "trials", "skipped", "training FLOPs", "device-hours"):
        total.add_column(col, justify="left" if col == "hardware" else "right")
    for name in sorted({p.hardware.name for p in plans}):
        group = [p for p in plans if p.hardware.name == name]
        total.add_row(
            name, str(len(group)), f"{sum(p.configurations for p in group):,}", f"{sum(p.planned_trials for p in group):,}",
            f"{sum(len(p.skipped) for p in group):,}",
            _si(sum(p.train_flops for p in group)), f"{sum(p.device_hours for p in group):,.1f} {group[0].hardware.unit}-h",
        )
    console.print(total)
    if cluster is not None:
        nodes = cluster['gpus'] // cluster['gpus_per_node']
        console.print(f"on {cluster['gpus']} GPUs ({nodes} node{'s' * (nodes != 1)} of "
                      f"{cluster['gpus_per_node']}): {cluster['trials']:,} trial{'s' * (cluster['trials'] != 1)} in about {_hours(cluster['wall_hours'])} "
                      f"(one queue, {cluster['order']}; lower bound {_hours(cluster['bound_hours'])}, GPU utilisation "
                      f"{cluster['utilisation']:.1%}); on the plan's estimates")


def _devices(t: Any) -> str:
    """GPUs of the trial's shape ('1', '8 (1 node)', '16 (2 nodes)'), or its CPU cores."""
    shape = t.shape
    if not shape.gpus_per_worker:
        return f"{shape.workers * shape.cpus_per_worker:g} CPU"
    return f"{shape.gpus:g}" + (f" ({shape.nodes} nodes)" if shape.nodes > 1 else "")


def _memory(t: Any) -> str:
    """The memory plan's estimate per GPU, and the sharding when it is not plain DDP."""
    if t.memory_per_gpu is None:
        return "-"
    return f"{t.memory_per_gpu / 1e9:.1f} GB" + (" fsdp" if t.sharding == "fsdp" else "")


def _points(plan: Plan) -> str:
    seeds = len(plan.spec.seed_list)
    configs = plan.configurations
    return f"{configs} configuration{'s' * (configs != 1)} x {seeds} seed{'s' * (seeds != 1)}"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _space(p: Any) -> str:
    if p.is_range:
        return f"{p.distribution}[{p.min:g}, {p.max:g}]"
    return "{" + ", ".join(map(str, p.choices)) + "}"


def plans_json(plans: list[Plan], cluster: dict[str, Any] | None = None) -> dict[str, Any]:
    """One object: `sweeps` (a summary each), `trials` and `skipped` of all sweeps, `totals`
    (and `cluster`, the queue's wall time on `--gpus`)."""
    sweeps = []
    for p in plans:
        sweeps.append({
            "name": p.spec.name, "path": str(p.path), "method": p.spec.method, "trials": p.planned_trials,
            "configurations": p.configurations, "seeds": len(p.spec.seed_list),
            "skipped": len(p.skipped), "train_flops": p.train_flops, "device_hours": p.device_hours,
            "hardware": p.hardware.name,
            "search_space": {k: v.to_dict() for k, v in p.spec.parameters.items()} if p.spec.method == "bayes" else None,
            "typical_trial": p.estimate.to_dict(with_config=False) if p.estimate else None,
            "largest_memory_per_gpu": p.largest.memory_per_gpu if p.largest else None,
        })
    return {
        "sweeps": sweeps,
        "trials": [t.to_dict() for p in plans for t in p.trials],
        "skipped": [s.to_dict() for p in plans for s in p.skipped],
        "totals": {
            "trials": sum(p.planned_trials for p in plans),
            "configurations": sum(p.configurations for p in plans),
            "skipped": sum(len(p.skipped) for p in plans),
            "train_flops": sum(p.train_flops for p in plans),
            "device_hours": {
                hw: sum(p.device_hours for p in plans if p.hardware.name == hw) for hw in sorted({p.hardware.name for p in plans})
            },
        },
        **({"cluster": cluster} if cluster is not None else {}),
    }
