"""Which trials a finding compares: the prepared trials table, controlled groups, trials paired by
seed and every other setting, the plain-MoE baselines, and the routing statistics of the steps table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from analysis.stats import SETTINGS, completed, controlled_groups


def prepare(trials: pd.DataFrame) -> pd.DataFrame:
    """Completed trials with the columns the findings read. `overflow` (capacity trials: "drop" or
    "default_expert", missing means "drop"; dropless: null) joins the setting key, so trials that
    differ only in it are not taken for seed repeats."""
    df = completed(trials)
    for col in SETTINGS + ["seed", "sweep", "trial_id", "val_loss", "total_params", "active_params", "train_flops",
                           "probe_loss_increase", "overflow"]:
        if col not in df:
            df[col] = np.nan
    df["overflow"] = df["overflow"].astype(object).fillna("drop").where(df["capacity_factor"].notna(), None)
    df["setting"] = df["setting"] + "|overflow=" + df["overflow"].fillna("none").astype(str)
    return df


def controlled(df: pd.DataFrame, factors: list[str], min_levels: int = 2, primary: str | None = None,
               same_sweep: bool = False) -> list[pd.DataFrame]:
    """`controlled_groups`, also split by the overflow option (a setting stats.SETTINGS predates)."""
    out = []
    for group in controlled_groups(df, factors, min_levels, primary, same_sweep):
        for _, sub in group.groupby("overflow", dropna=False):
            if len(sub[[primary] if primary else factors].astype(str).drop_duplicates()) >= min_levels:
                out.append(sub)
    return out


def _scalar(v: object) -> object:
    """A setting value as a key part: nulls alike, numbers as float (1 == 1.0)."""
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return None
    return float(v) if isinstance(v, (int, float, np.integer, np.floating)) else str(v)


def row_keys(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    """One string per row naming its values of `cols`."""
    rows = df[cols].itertuples(index=False, name=None)
    return pd.Series([json.dumps([_scalar(v) for v in row]) for row in rows], index=df.index, dtype=object)


def pair_trials(a: pd.DataFrame, b: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Each row of `a` with each row of `b` equal in every column of `keys` (b's columns get `_ref`),
    and `delta` = a's val_loss - b's."""
    p = a.assign(_k=row_keys(a, keys)).merge(b.assign(_k=row_keys(b, keys)), on="_k", suffixes=("", "_ref"))
    return p.assign(delta=p["val_loss"] - p["val_loss_ref"])


def all_but(*cols: str) -> list[str]:
    """Pairing keys: the seed and every setting except `cols`."""
    return [c for c in SETTINGS if c not in cols] + ["seed"]


def per_comparison(p: pd.DataFrame, cols: list[str], values: tuple[str, ...] = ("delta",)) -> pd.DataFrame:
    """One row per compared pair of settings (`setting`, `setting_ref`): `cols` (of the first
    trial), the mean of `values` over its seed pairs, and `seeds` (how many)."""
    if p.empty:
        return pd.DataFrame(columns=["setting", "setting_ref"] + cols + list(values) + ["seeds"])
    g = p.groupby(["setting", "setting_ref"], sort=False)
    out = g[cols].first()
    for v in values:
        out[v] = g[v].mean()
    out["seeds"] = g["seed"].nunique()
    return out.reset_index()


def last_routing(steps: pd.DataFrame, stats: list[str]) -> pd.DataFrame:
    """Per trial, the last logged value of each `routing/<stat>` the steps table has (as <stat>)."""
    cols = [f"routing/{s}" for s in stats if f"routing/{s}" in steps]
    if steps.empty or not cols:
        return pd.DataFrame(columns=["trial_id"])
    # A column that is null in every row of a per-trial file is stored as text: read it as numbers.
    numeric = steps[["trial_id", "step"]].assign(**{c: pd.to_numeric(steps[c], errors="coerce") for c in cols})
    last = numeric.sort_values("step").groupby("trial_id")[cols].last()  # last non-null: the last logging step
    return last.rename(columns=lambda c: c.split("/", 1)[1]).reset_index()


def plain_moe(df: pd.DataFrame) -> pd.DataFrame:
    """Plain layer-wise MoEs: one expert set, no shared experts."""
    plain = (df["expert_sets"].fillna(1) <= 1) & (df["shared_experts"].fillna(0) == 0)
    return df[(df["layout"] == "layerwise") & plain]


def vanilla_moe(df: pd.DataFrame) -> pd.DataFrame:
    """Plain layer-wise MoEs with independent routers (the baseline of balancing, UniPool, PathMoE)."""
    moe = plain_moe(df)
    return moe[moe["router_block_size"].fillna(1) == 1]

