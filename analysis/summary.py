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


def summarize(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per (run, arm, level): density, seeds, diverged (how many of the seeds diverged), and
    mean/std/95% CI over seeds of the final and best ``split`` accuracy and of the early-stop step."""
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
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.sort_values(["run_id", "arm", "level"], ignore_index=True)


def _per_seed(g: pd.DataFrame) -> pd.Series:
    g = g.sort_values("step")
    diverged = bool((g["diverged_step"] >= 0).any()) if "diverged_step" in g else False
    return pd.Series({"density": g["density"].iloc[-1], "final_accuracy": g["accuracy"].iloc[-1],
                      "best_accuracy": g["accuracy"].max(), "early_stop_step": g["early_stop_step"].iloc[-1],
                      "diverged": diverged})
