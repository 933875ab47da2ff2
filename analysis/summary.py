"""Summaries over seeds per (run, arm, level): the early-stop selection (on validation), the test
accuracy read at it, the seed spread (n, min-max, 95% CI) and paired ticket-minus-control differences.

Accuracies stay fractions (0.85) in every DataFrame here; the report's tables print them in percent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

GROUP = ["run_id", "experiment", "arm", "level"]
SELECT = ("accuracy", "loss")  # early stop: the step of peak validation accuracy, or of minimum validation loss
MIN_SEEDS_FOR_CI = 3  # DESIGN.md rule 4: min-max below 3 seeds, the 95% t-interval from 3 on
BPB = "bits_per_byte"  # a language model's metric (lth.train.lm_metrics): lower is better


def is_language_model(df: pd.DataFrame) -> bool:
    """Whether the rows are a language model's (text data): they carry finite bits per byte, the metric
    it is judged by (lower is better) instead of accuracy (per token, for a language model)."""
    return BPB in df and bool(np.isfinite(pd.to_numeric(df[BPB], errors="coerce")).any())


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


def spread_columns(values, prefix: str) -> dict[str, float]:
    """``{prefix}_n, _mean, _std, _min, _max, _ci_low, _ci_high, _spread_low, _spread_high`` of the finite
    ``values`` (one per seed). The 95% t-interval is NaN below 3 values (DESIGN.md rule 4); the spread is
    the one the figures draw (:func:`seed_spread`)."""
    x = np.asarray(values, float)
    x = x[np.isfinite(x)]
    n = len(x)
    ci = _ci(pd.Series(x)) if n >= MIN_SEEDS_FOR_CI else (np.nan, np.nan)
    lo, hi = seed_spread(x)[1:3]
    return {f"{prefix}_n": n, f"{prefix}_mean": float(x.mean()) if n else np.nan,
            f"{prefix}_std": float(x.std(ddof=1)) if n > 1 else (0.0 if n else np.nan),
            f"{prefix}_min": float(x.min()) if n else np.nan, f"{prefix}_max": float(x.max()) if n else np.nan,
            f"{prefix}_ci_low": ci[0], f"{prefix}_ci_high": ci[1],
            f"{prefix}_spread_low": lo, f"{prefix}_spread_high": hi}


def _check_select(select: str) -> None:
    if select not in SELECT:
        raise ValueError(f"select = {select!r}: the early-stop step is chosen on the validation split by "
                         f"one of {', '.join(SELECT)} (analysis.summary.per_seed)")


def swept_keys(df: pd.DataFrame) -> list[str]:
    """The flattened hparams (dotted names, e.g. ``prune.rate``) whose values differ between the runs of
    ``df``: the keys a sweep varied, which tell its runs apart in a table (:func:`analysis.runs.swept_keys`),
    and ``prune.levels`` where it differs (how many levels each run's rows cover; the seeds and arms of
    a run are :func:`summarize`'s own ``seeds`` column and its rows)."""
    from .runs import swept_keys as runs_swept_keys

    return runs_swept_keys(df, members=True) if "run_id" in df else []


def per_seed(df: pd.DataFrame, select: str = "accuracy", split: str = "test") -> pd.DataFrame:
    """One row per (run, arm, level, seed) of the float training rows of a :func:`analysis.load_runs` table.

    The early-stop step is selected on the validation split, never on ``split``: the first evaluated step
    of peak validation accuracy (``select="accuracy"``, the default) or of minimum validation loss
    (``select="loss"``, what the store's own ``early_stop_step`` column records). ``split`` (test) is
    only read at that step, as Frankle & Carbin (2019) report test accuracy at the early-stop iteration.

    Columns: run_id, experiment, arm, level, seed, density, diverged (bool), final_accuracy (``split``
    accuracy at the last evaluated step), early_stop_step, early_stop_val_accuracy,
    early_stop_val_loss, ``early_stop_{split}_accuracy``, last_step (the last evaluated step) and
    still_improving (the early-stop step is the last evaluated step: validation had not peaked yet, so
    training did not "stop early"). Without validation rows (``data.val_size = 0``) the early-stop
    columns are NaN and still_improving is False. Accuracies are fractions.
    """
    _check_select(select)
    keys = ["run_id", "experiment", "arm", "level", "seed"]
    f = df[_float(df)]
    rep = f[f["split"] == split].sort_values("step", kind="stable")
    val = f[f["split"] == "val"]
    out = rep.groupby(keys, sort=False, dropna=False).agg(
        density=("density", "last"), final_accuracy=("accuracy", "last"), last_step=("step", "max"))
    if "diverged_step" in f:
        div = (f["diverged_step"] >= 0).groupby([f[k] for k in keys], sort=False, dropna=False).any()
        out["diverged"] = div.reindex(out.index, fill_value=False).astype(bool)
    else:
        out["diverged"] = False
    score = val["accuracy"] if select == "accuracy" else -val["loss"]
    # the first (earliest) step of the peak: sort by score descending, then step ascending
    v = (val.assign(_score=score.where(np.isfinite(score), -np.inf))
         .sort_values(["_score", "step"], ascending=[False, True], kind="stable")
         .groupby(keys, sort=False, dropna=False).head(1).set_index(keys))
    out["early_stop_step"] = v["step"].reindex(out.index).astype(float)
    out["early_stop_val_accuracy"] = v["accuracy"].reindex(out.index)
    out["early_stop_val_loss"] = v["loss"].reindex(out.index)
    at = rep.set_index(keys + ["step"])["accuracy"]
    at = at[~at.index.duplicated()]
    idx = pd.MultiIndex.from_arrays([*(out.index.get_level_values(k) for k in keys), out["early_stop_step"]])
    out[f"early_stop_{split}_accuracy"] = at.reindex(idx).to_numpy()
    val_last = val.groupby(keys, sort=False, dropna=False)["step"].max().reindex(out.index)
    out["last_step"] = np.fmax(out["last_step"], val_last).astype(int)
    out["still_improving"] = (out["early_stop_step"] == val_last).to_numpy()
    cols = ["density", "diverged", "final_accuracy", "early_stop_step", "early_stop_val_accuracy",
            "early_stop_val_loss", f"early_stop_{split}_accuracy", "last_step", "still_improving"]
    if is_language_model(f):  # bits per byte at the end and at the early-stop step (read, not selected, on split)
        out[f"final_{BPB}"] = rep.groupby(keys, sort=False, dropna=False)[BPB].last().reindex(out.index)
        at = rep.set_index(keys + ["step"])[BPB]
        at = at[~at.index.duplicated()]
        out[f"early_stop_{split}_{BPB}"] = at.reindex(idx).to_numpy()
        cols += [f"final_{BPB}", f"early_stop_{split}_{BPB}"]
    out = out[list(dict.fromkeys(cols))].reset_index()  # split="val": one early_stop_val_accuracy column
    return out


def summarize(df: pd.DataFrame, split: str = "test", select: str = "accuracy") -> pd.DataFrame:
    """One row per (run, arm, level) of the per-seed table (:func:`per_seed`): density, seeds (n),
    diverged and still_improving (how many of the seeds), the swept keys (:func:`swept_keys`), and for
    ``final_accuracy``, ``early_stop_{split}_accuracy`` and ``early_stop_step`` the spread over seeds
    (:func:`spread_columns`: ``_n, _mean, _std, _min, _max, _ci_low, _ci_high`` (95% t-interval, NaN
    below 3 seeds), ``_spread_low/high`` (what the figures draw)). The early-stop step is selected on
    the validation split (``select``: peak accuracy or minimum loss); nothing is selected on ``split``.
    Accuracies are fractions."""
    seeds = per_seed(df, select=select, split=split)
    sweep = swept_keys(df)
    hp = df.drop_duplicates("run_id").set_index("run_id")[sweep] if sweep else None
    rows = []
    for key, g in seeds.groupby(GROUP, sort=False, dropna=False):
        row = dict(zip(GROUP, key))
        if hp is not None:
            row.update(hp.loc[key[0]].to_dict())
        row["density"] = float(g["density"].mean())
        row["seeds"] = int(g["seed"].nunique())
        row["diverged"] = int(g["diverged"].sum())  # seeds whose loss diverged (lth.train.diverged_steps)
        row["still_improving"] = int(g["still_improving"].sum())  # seeds whose val peak is the last step
        for col in ("final_accuracy", f"early_stop_{split}_accuracy", "early_stop_step", f"final_{BPB}",
                    f"early_stop_{split}_{BPB}"):
            if col in g:  # (bits per byte: language models only)
                row.update(spread_columns(g[col], col))
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    return out.sort_values(["run_id", "arm", "level"], ignore_index=True)


def paired_differences(df: pd.DataFrame, reference: str = "ticket", select: str = "accuracy",
                       metrics=("early_stop_test_accuracy", "final_accuracy")) -> pd.DataFrame:
    """``reference`` minus each other arm, matched by (run, level, seed): one row per (run, level, arm,
    metric) where both arms have the seed, with the reference's density, n (matched seeds) and the
    spread of the per-seed differences (``diff_mean, diff_std, diff_min, diff_max``, ``diff_ci_low/high``:
    the 95% paired t-interval, NaN below 3 seeds). ``metrics`` are :func:`per_seed` columns; differences
    are in accuracy fractions (0.01 = 1 percentage point). Levels where only the reference ran give no row."""
    seeds = per_seed(df, select=select)
    missing = [m for m in metrics if m not in seeds]
    if missing:
        raise ValueError(f"metrics {missing}: not per-seed columns; allowed: "
                         f"{', '.join(c for c in seeds.columns if c.endswith('accuracy'))}")
    if len(seeds) and reference not in set(seeds["arm"]):
        raise ValueError(f"reference = {reference!r} is not an arm of the table; arms: "
                         f"{', '.join(sorted(map(str, seeds['arm'].unique())))} (analysis.summary.paired_differences)")
    keys = ["run_id", "level", "seed"]
    ref = seeds.loc[seeds["arm"] == reference, keys + ["density", *metrics]]
    pairs = seeds[seeds["arm"] != reference].merge(ref, on=keys, suffixes=("", "_ref"))  # matched seeds only
    rows = []
    for (run_id, experiment, arm, level), g in pairs.groupby(GROUP, sort=True, dropna=False):
        for metric in metrics:
            s = spread_columns(g[f"{metric}_ref"] - g[metric], "diff")
            rows.append({"run_id": run_id, "experiment": experiment, "level": level,
                         "density": float(g["density_ref"].mean()), "reference": reference, "arm": arm,
                         "metric": metric, "n": s.pop("diff_n"),
                         **{k: v for k, v in s.items() if "spread" not in k}})
    cols = ["run_id", "experiment", "level", "density", "reference", "arm", "metric", "n", "diff_mean", "diff_std",
            "diff_min", "diff_max", "diff_ci_low", "diff_ci_high"]
    return pd.DataFrame(rows, columns=cols)
