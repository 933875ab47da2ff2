"""Summaries over seeds: mean, std and 95% confidence interval per (run, arm, level)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

GROUP = ["run_id", "experiment", "arm", "level"]


def final_rows(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """The last evaluation of each (run, arm, seed, level) on ``split``."""
    d = df[(df["split"] == split) & _float(df)]
    last = d.groupby(["run_id", "arm", "seed", "level"])["step"].transform("max")
    return d[d["step"] == last]


def _float(df: pd.DataFrame) -> pd.Series:
    return df["method"] == "float" if "method" in df else pd.Series(True, index=df.index)


def _ci(x: pd.Series) -> tuple[float, float]:
    x = x.dropna().to_numpy(float)
    if len(x) < 2:
        m = float(x.mean()) if len(x) else np.nan
        return m, m
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def seed_spread(values) -> tuple[float, float, float, str]:
    """(mean, low, high, rule) over seeds: min-max below 3 seeds (a t-interval over 2 seeds is 12.7
    standard errors wide and hides the curves), the 95% t-interval from 3 seeds on."""
    x = np.asarray(values, float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return np.nan, np.nan, np.nan, "no data"
    m = float(x.mean())
    if len(x) < 3:
        return m, float(x.min()), float(x.max()), f"min-max over {len(x)} seed{'s' if len(x) > 1 else ''}"
    lo, hi = _ci(pd.Series(x))
    return m, lo, hi, f"95% CI over {len(x)} seeds"


def spread_rule(seeds: int) -> str:
    """How figures show the spread over ``seeds`` seeds (see :func:`seed_spread`)."""
    return f"min-max over {seeds} seed{'s' if seeds != 1 else ''}" if seeds < 3 else f"95% CI over {seeds} seeds"


def summarize(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per (run, arm, level): density, seeds, diverged (how many of the seeds diverged), and
    mean/std/95% CI over seeds of the final and best ``split`` accuracy and of the early-stop step, and
    the spread the figures draw (``*_spread_low/high``: min-max below 3 seeds, else the 95% CI)."""
    d = df[(df["split"] == split) & _float(df)]
    per_seed = (d.groupby(["run_id", "experiment", "arm", "level", "seed"], sort=False)
                .apply(_per_seed, include_groups=False).reset_index())
    rows = []
    for key, g in per_seed.groupby(GROUP, sort=False):
        row = dict(zip(GROUP, key))
        row["density"] = float(g["density"].mean())
        row["seeds"] = int(g["seed"].nunique())
        row["diverged"] = int(g["diverged"].sum())  # seeds whose loss diverged (lth.train.diverged_steps)
        for col in ("final_accuracy", "best_accuracy", "early_stop_step"):
            row[f"{col}_mean"] = float(g[col].mean())
            row[f"{col}_std"] = float(g[col].std(ddof=1)) if len(g) > 1 else 0.0
            row[f"{col}_ci_low"], row[f"{col}_ci_high"] = _ci(g[col])
            row[f"{col}_spread_low"], row[f"{col}_spread_high"] = seed_spread(g[col])[1:3]
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.sort_values(["run_id", "arm", "level"], ignore_index=True)


def _per_seed(g: pd.DataFrame) -> pd.Series:
    g = g.sort_values("step")
    diverged = bool((g["diverged_step"] >= 0).any()) if "diverged_step" in g else False
    return pd.Series({"density": g["density"].iloc[-1], "final_accuracy": g["accuracy"].iloc[-1],
                      "best_accuracy": g["accuracy"].max(), "early_stop_step": g["early_stop_step"].iloc[-1],
                      "diverged": diverged})
