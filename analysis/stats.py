"""Small statistics the findings share: completed trials, seed noise, controlled comparisons.

"Controlled" means: compare trials that differ only in the factor under study. Trials are grouped
by every resolved setting except that factor (and the seed), so an effect is never a mix of
scales or of other sweeps' settings.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

# Resolved columns that define a trial apart from its seed (docs/results.md).
SETTINGS = [
    "scale", "layout", "sparsity", "num_experts", "top_k", "granularity", "expert_sets", "expert_width",
    "shared_experts", "shared_granularity", "pool_group_size", "router_scoring", "router_block_size",
    "router_dtype", "capacity_factor", "aux_weight", "aux_scope", "pool_weight", "z_weight", "bias_rate", "lr",
    "batch_tokens", "train_tokens", "data_source", "d_model", "n_layers",
]


def completed(trials: pd.DataFrame) -> pd.DataFrame:
    """Completed trials with a finite validation loss, with a `setting` key (config without seed)."""
    if trials.empty or "status" not in trials:
        return trials.iloc[0:0].assign(setting=pd.Series(dtype=str))
    df = trials[(trials["status"] == "completed") & np.isfinite(trials["val_loss"].astype(float))].copy()
    for col in SETTINGS:
        if col not in df:
            df[col] = np.nan
    # Tables written before `router_dtype` existed routed in float32, as its default does now.
    df["router_dtype"] = df["router_dtype"].astype(object).where(df["router_dtype"].notna(), "float32") \
        .where(df["router_scoring"].notna(), None)
    df["setting"] = [_setting_key(r) for r in df.to_dict("records")]
    return df


def _setting_key(row: dict) -> str:
    raw = row.get("config_json")
    if isinstance(raw, str) and raw:
        config = json.loads(raw)
        config.pop("seed", None)
        config.get("data", {}).pop("cache_dir", None)
        return json.dumps(config, sort_keys=True)
    return json.dumps({c: _plain(row.get(c)) for c in SETTINGS}, sort_keys=True)


def _plain(v: object) -> object:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


def seed_noise(df: pd.DataFrame) -> float | None:
    """Pooled standard deviation of val_loss over seeds of identical settings (None without repeats)."""
    if df.empty:
        return None
    # The same setting and seed in two sweeps is one run twice (deterministic): not a repeat.
    per_seed = df.groupby(["setting", "seed"], dropna=False)["val_loss"].mean().reset_index()
    groups = per_seed.groupby("setting")["val_loss"]
    var = groups.var(ddof=1)
    counts = groups.count()
    ok = counts >= 2
    if not ok.any():
        return None
    dof = (counts[ok] - 1).sum()
    return float(math.sqrt(((counts[ok] - 1) * var[ok]).sum() / dof))


def controlled_groups(df: pd.DataFrame, factors: list[str], min_levels: int = 2, primary: str | None = None,
                      same_sweep: bool = False) -> list[pd.DataFrame]:
    """Groups of trials equal in every setting except `factors` (and the seed), each with at
    least `min_levels` distinct levels of the factors (of `primary` alone when given: the other
    factors are the settings that move with it, like top-k with granularity). `same_sweep` keeps
    comparisons inside one sweep, for factors whose variants move several settings at once."""
    keys = [c for c in SETTINGS if c not in factors] + (["sweep"] if same_sweep else [])
    out = []
    for _, group in df.groupby(keys, dropna=False):
        levels = group[[primary] if primary else factors].astype(str).drop_duplicates()
        if len(levels) >= min_levels:
            out.append(group)
    return out


def mean_by(group: pd.DataFrame, by: list[str] | str) -> pd.Series:
    """Mean val_loss per level (seeds averaged), NaN levels kept."""
    return group.groupby(by, dropna=False)["val_loss"].mean()


def difference_se(noise: float, n: int) -> float:
    """Standard error of a difference of two means of `n` seeds each, for a per-seed `noise`."""
    return noise * math.sqrt(2 / max(n, 1))


def beyond_noise(effect: float, noise: float | None, n: int = 1) -> bool | None:
    """Is |effect| larger than twice the standard error of a difference of means of `n` seeds?
    None when the noise is unknown (no repeated seeds)."""
    if noise is None:
        return None
    return bool(abs(effect) > 2 * difference_se(noise, n))
