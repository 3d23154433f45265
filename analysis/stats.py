"""Small statistics the findings share: completed trials, seed noise, controlled comparisons.

"Controlled" means: compare trials that differ only in the factor under study. Trials are grouped
by every resolved setting except that factor (and the seed), so an effect is never a mix of
scales or of other sweeps' settings.
"""

from __future__ import annotations

import functools
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


def _pooled_seed_variance(df: pd.DataFrame) -> tuple[float, int] | None:
    """Pooled variance of val_loss over seeds of identical settings and its degrees of freedom."""
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
    dof = int((counts[ok] - 1).sum())
    return float(((counts[ok] - 1) * var[ok]).sum() / dof), dof


def seed_noise(df: pd.DataFrame) -> float | None:
    """Pooled standard deviation of val_loss over seeds of identical settings (None without repeats)."""
    pooled = _pooled_seed_variance(df)
    return None if pooled is None else math.sqrt(pooled[0])


def seed_noise_dof(df: pd.DataFrame) -> int | None:
    """Degrees of freedom of `seed_noise` (seeds minus one, summed over settings; None without repeats)."""
    pooled = _pooled_seed_variance(df)
    return None if pooled is None else pooled[1]


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


# -- the studentized range: the range of k means against the seed noise --------------------------
# The range of k means of pure noise grows with k (about 2.8 noise standard errors for k = 2, 4.5
# for k = 10), so a threshold fixed in standard errors calls many settings an effect by chance.
# Its null distribution is Tukey's studentized range q(k, dof). SciPy is not a dependency: the
# distribution is integrated numerically on fixed grids, below.
_STEP = 0.01  # grid step of the normal integrals (smooth integrands: q to 4 decimals, as tables print 3)
_Z_MAX = 8.0  # a standard normal beyond +-8 carries < 1e-15
_X_MAX = 12.0  # the range of k <= 100 standard normals exceeds 12 with P < 1e-12
_LARGE_DOF = 100_000  # above this the noise estimate is exact for 4 decimals of q
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # renamed in NumPy 2.0


@functools.cache
def _range_cdf_known_noise(k: int) -> np.ndarray:
    """P(range of k standard normals <= x) at x = 0, _STEP, ..., _X_MAX:
    k * integral of phi(z) (Phi(z + x) - Phi(z))^(k - 1) dz (the smallest of the k is at z)."""
    nz, nx = round(2 * _Z_MAX / _STEP) + 1, round(_X_MAX / _STEP) + 1
    t = -_Z_MAX + _STEP * np.arange(nz + nx - 1)  # z grid extended by x: z_j + x_m = t[j + m]
    cdf_t = 0.5 * np.vectorize(math.erfc)(-t / math.sqrt(2))
    z, cdf_z = t[:nz], cdf_t[:nz]
    pdf_z = np.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)
    window = cdf_t[np.arange(nx)[:, None] + np.arange(nz)[None, :]] - cdf_z[None, :]
    out = k * _trapezoid(pdf_z * window ** (k - 1), dx=_STEP, axis=1)
    return np.clip(out, 0.0, 1.0)


def studentized_range_cdf(q: float, k: int, dof: float = math.inf) -> float:
    """P(Q <= q) for Q = (range of k means) / (their standard error estimated with `dof` degrees of
    freedom): the known-noise distribution averaged over s = estimated / true noise, which is
    sqrt(chi2(dof) / dof) distributed."""
    if k < 2:
        raise ValueError(f"the studentized range needs k >= 2 means, got k = {k}")
    if q <= 0:
        return 0.0
    xs = _STEP * np.arange(round(_X_MAX / _STEP) + 1)
    known = _range_cdf_known_noise(k)
    if dof >= _LARGE_DOF:
        return float(np.interp(q, xs, known, right=1.0))
    width = 12 / math.sqrt(2 * dof)  # s has mean ~1 and sd ~1 / sqrt(2 dof): 12 sd either side
    s = np.linspace(max(1 - width, 1e-9), 1 + width, 4001)
    log_pdf = (math.log(2) + (dof / 2) * math.log(dof / 2) - math.lgamma(dof / 2)
               + (dof - 1) * np.log(s) - dof * s ** 2 / 2)
    pdf = np.exp(log_pdf)
    pdf /= _trapezoid(pdf, s)  # renormalise what the grid cut off (< 1e-12)
    return float(_trapezoid(pdf * np.interp(q * s, xs, known, right=1.0), s))


@functools.cache
def studentized_range_quantile(p: float, k: int, dof: float = math.inf) -> float:
    """q with P(Q <= q) = p for the studentized range of k means and `dof` (bisection)."""
    if not 0 < p < 1:
        raise ValueError(f"a quantile needs 0 < p < 1, got p = {p}")
    lo, hi = 0.0, 8.0
    while studentized_range_cdf(hi, k, dof) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if studentized_range_cdf(mid, k, dof) < p else (lo, mid)
    return (lo + hi) / 2


def range_interval(spread: float, k: int, n: int, noise: float | None, dof: float = math.inf,
                   level: float = 0.95) -> tuple[float, float]:
    """Confidence interval for the range of k true means, from the range `spread` of their n-seed
    means: spread -+ q(level; k, dof) * noise / sqrt(n), the low end at 0. Tukey's intervals hold
    for every pair of means at once with probability `level`, and then the true range lies in
    there too. Without noise (no repeated seeds) the point itself."""
    if noise is None or k < 2:
        return spread, spread
    half = studentized_range_quantile(level, k, dof) * noise / math.sqrt(max(n, 1))
    return max(spread - half, 0.0), spread + half


def range_p_value(spread: float, k: int, n: int, noise: float | None, dof: float = math.inf) -> float | None:
    """P(a range this wide or wider from noise alone) for k n-seed means (None without noise)."""
    if noise is None or k < 2:
        return None
    if noise == 0:
        return 0.0 if spread > 0 else 1.0
    return max(0.0, 1.0 - studentized_range_cdf(spread * math.sqrt(max(n, 1)) / noise, k, dof))
