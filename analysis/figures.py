"""Paper figures from the tidy runs DataFrame. Each function returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .summary import seed_spread, spread_rule, summarize  # noqa: E402,F401 - seed_spread: public here too

ARM_STYLE = {
    "ticket": dict(color="#1f77b4", marker="o", label="winning ticket"),
    "reinit": dict(color="#d62728", marker="s", label="random reinit"),
    "random_prune": dict(color="#2ca02c", marker="^", label="random pruning"),
    "shuffle": dict(color="#9467bd", marker="v", label="shuffled mask"),
    "small_dense": dict(color="#ff7f0e", marker="D", label="small dense"),
    "dense": dict(color="#000000", marker="*", label="dense (level 0)"),
    "snip": dict(color="#8c564b", marker="P", label="SNIP"),
    "grasp": dict(color="#e377c2", marker="X", label="GraSP"),
    "synflow": dict(color="#17becf", marker="h", label="SynFlow"),
    "snip_shuffle": dict(color="#8c564b", marker="P", linestyle="--", label="SNIP, shuffled per layer"),
    "grasp_shuffle": dict(color="#e377c2", marker="X", linestyle="--", label="GraSP, shuffled per layer"),
    "synflow_shuffle": dict(color="#17becf", marker="h", linestyle="--", label="SynFlow, shuffled per layer"),
}
PAI_ARMS = ("snip", "grasp", "synflow", "snip_shuffle", "grasp_shuffle", "synflow_shuffle")
BITS_MARKER = {32: "o", 8: "s", 4: "^", 3: "v", 2: "D", 1: "x"}

STYLE = {"font.size": 10, "axes.labelsize": 10, "axes.titlesize": 11, "legend.fontsize": 9,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.grid": True, "grid.alpha": 0.3,
         "pdf.fonttype": 42, "ps.fonttype": 42}


def density_axis(ax, densities) -> None:
    """Log x axis of weights remaining (%), 100% on the left."""
    ax.set_xscale("log")
    ax.invert_xaxis()
    ticks = sorted(set(np.round(densities, 3)), reverse=True)
    if len(ticks) > 8:
        ticks = ticks[:: max(1, len(ticks) // 8)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{100 * t:.3g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("weights remaining (%)")


_density_axis = density_axis


def _arm_lines(ax, summary: pd.DataFrame, y: str, scale: float = 1.0) -> None:
    """One line + band per arm; controls start from the shared dense network (level 0)."""
    dense = summary[summary["level"] == 0]
    order = [a for a in ARM_STYLE if a in set(summary["arm"])] + sorted(set(summary["arm"]) - set(ARM_STYLE))
    for arm in order:
        g = summary[summary["arm"] == arm]
        if arm != "ticket" and not (g["level"] == 0).any():
            g = pd.concat([dense[dense["run_id"].isin(g["run_id"])], g])
        g = g.sort_values("density", ascending=False)
        st = ARM_STYLE.get(arm, dict(label=arm))
        mean = g[f"{y}_mean"].to_numpy() * scale
        lo, hi = g[f"{y}_spread_low"].to_numpy() * scale, g[f"{y}_spread_high"].to_numpy() * scale
        ax.plot(g["density"], mean, markersize=4, **st)
        ax.fill_between(g["density"], lo, hi, color=st.get("color"), alpha=0.2, linewidth=0)
        if "diverged" in g and (g["diverged"] > 0).any():  # a seed whose loss diverged: a black cross
            bad = (g["diverged"] > 0).to_numpy()
            first = not any(c.get_label() == "diverged" for c in ax.collections)
            ax.scatter(g["density"][bad], mean[bad], marker="x", s=50, color="black", zorder=5,
                       label="diverged" if first else "_nolegend_")


def _seeds_note(summary: pd.DataFrame) -> str:
    n = sorted(set(summary["seeds"].astype(int)))
    if len(n) == 1 or n[-1] < 3 or n[0] >= 3:
        rule = spread_rule(n[-1]) if len(n) == 1 else spread_rule(n[-1]).replace(str(n[-1]), f"{n[0]}-{n[-1]}", 1)
        return f"mean and {rule}"
    return f"mean and min-max (below 3 seeds) or 95% CI ({n[0]}-{n[-1]} seeds)"


def accuracy_vs_density(df: pd.DataFrame, split: str = "test", metric: str = "final") -> plt.Figure:
    """Final (or best) test accuracy vs weights remaining, one line + CI band per arm (LTH Fig. 3)."""
    s = summarize(df, split=split)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        _arm_lines(ax, s, f"{metric}_accuracy", scale=100)
        _density_axis(ax, s["density"])
        ax.set_ylabel(f"{metric} {split} accuracy (%)")
        ax.set_title(f"{_title(df)}: {split} accuracy vs sparsity")
        ax.legend(title=_seeds_note(s), title_fontsize=8)
    return fig


def pai_accuracy_vs_density(df: pd.DataFrame, split: str = "test") -> plt.Figure:
    """Final accuracy vs weights remaining of the pruning-at-init arms (and their layerwise shuffles,
    dashed) beside the ticket and random pruning at the same per-layer counts."""
    keep = ("ticket", "random_prune", *PAI_ARMS)
    s = summarize(df[df["arm"].isin(keep)], split=split)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        _arm_lines(ax, s, "final_accuracy", scale=100)
        _density_axis(ax, s["density"])
        ax.set_ylabel(f"final {split} accuracy (%)")
        ax.set_title(f"{_title(df)}: pruning at init vs ticket")
        ax.legend(title=_seeds_note(s), title_fontsize=8, fontsize=7)
    return fig


def early_stop_vs_density(df: pd.DataFrame) -> plt.Figure:
    """Early-stopping step (minimum validation loss) vs weights remaining, per arm (LTH Fig. 3)."""
    s = summarize(df)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        _arm_lines(ax, s, "early_stop_step")
        _density_axis(ax, s["density"])
        ax.set_ylabel("early-stop step (iterations)")
        ax.set_title(f"{_title(df)}: early-stopping step vs sparsity")
        ax.legend(title=_seeds_note(s), title_fontsize=8)
    return fig


def learning_curves(df: pd.DataFrame, arm: str = "ticket", split: str = "test", max_levels: int = 6
                    ) -> plt.Figure:
    """Accuracy vs training step for a few levels of one arm (mean over seeds)."""
    d = df[(df["arm"] == arm) & (df["split"] == split)]
    levels = sorted(d["level"].unique())
    if len(levels) > max_levels:
        levels = [levels[i] for i in np.linspace(0, len(levels) - 1, max_levels).round().astype(int)]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        cmap = plt.get_cmap("viridis")
        for i, lv in enumerate(levels):
            g = d[d["level"] == lv].groupby("step")
            mean = g["accuracy"].mean() * 100
            dens = d[d["level"] == lv]["density"].mean()
            ax.plot(mean.index, mean.to_numpy(), color=cmap(i / max(1, len(levels) - 1)),
                    label=f"{100 * dens:.3g}% weights")
        ax.set_xlabel("training step (iterations)")
        ax.set_ylabel(f"{split} accuracy (%)")
        ax.set_title(f"{_title(df)}: {ARM_STYLE.get(arm, {}).get('label', arm)} learning curves")
        ax.legend()
    return fig


def _title(df: pd.DataFrame) -> str:
    names = df["experiment"].unique() if "experiment" in df else []
    return ", ".join(map(str, names)) or "lth"


def layer_density_profile(sparsity: pd.DataFrame, arm: str = "ticket") -> plt.Figure:
    """Density of each prunable layer across IMP levels (mean over seeds), from sparsity tables."""
    d = sparsity[(sparsity["arm"] == arm) & sparsity["prunable"]]
    table = d.groupby(["level", "layer"], sort=True)["density"].mean().unstack("layer")
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        for layer in table.columns:
            ax.plot(table.index, 100 * table[layer].to_numpy(), marker="o", markersize=3, label=layer)
        ax.set_yscale("log")
        ax.set_xlabel("IMP level")
        ax.set_ylabel("weights remaining in layer (%)")
        ax.set_title(f"per-layer density ({ARM_STYLE.get(arm, {}).get('label', arm)})")
        ax.legend(fontsize=7, ncol=2)
    return fig


def sparse_vs_dense(df: pd.DataFrame, split: str = "test") -> plt.Figure:
    """Final accuracy vs non-zero parameter count: large-sparse tickets vs small-dense models."""
    rows = final_rows_with_params(df, split)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        for arm in ("ticket", "small_dense"):
            g = rows[rows["arm"] == arm].groupby("level").agg(
                params=("param_count", "mean"), mean=("accuracy", "mean"), std=("accuracy", "std"))
            g = g.sort_values("params", ascending=False)
            st = ARM_STYLE[arm]
            ax.errorbar(g["params"], 100 * g["mean"], yerr=100 * g["std"].fillna(0), capsize=2, markersize=4,
                        **{**st, "label": "large sparse (ticket)" if arm == "ticket" else "small dense"})
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("non-zero parameters")
        ax.set_ylabel(f"final {split} accuracy (%)")
        ax.set_title(f"{_title(df)}: large-sparse vs small-dense")
        ax.legend(title=f"mean and std over {rows['seed'].nunique()} seeds", title_fontsize=8)
    return fig


def final_rows_with_params(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    from .summary import final_rows
    return final_rows(df, split).dropna(subset=["param_count"])


def sensitivity_curves(table: pd.DataFrame, split: str = "test") -> plt.Figure:
    """Accuracy when one layer alone is pruned to each density (no retraining), one line per layer."""
    t = table[table["split"] == split]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        for layer, g in t.groupby("layer", sort=True):
            g = g.sort_values("density", ascending=False)
            ax.plot(g["density"], 100 * g["accuracy"], marker="o", markersize=3, label=layer)
        if len(t):
            ax.axhline(100 * t["base_accuracy"].iloc[0], color="grey", linestyle="--", linewidth=1, label="unpruned")
        _density_axis(ax, t["density"])
        ax.set_xlabel("weights remaining in the pruned layer (%)")
        ax.set_ylabel(f"{split} accuracy (%)")
        ax.set_title("layer-wise pruning sensitivity (no retraining)")
        ax.legend(fontsize=7)
    return fig


def quant_heatmap(quant: pd.DataFrame, method: str | None = None) -> plt.Figure:
    """Mean test accuracy of the quantized ticket per (bits, weights remaining)."""
    q = quant[(quant["arm"] == "ticket")]
    if method is not None:
        q = q[q["method"] == method]
    table = q.groupby(["bits", "density"])["accuracy"].mean().unstack("density").sort_index(ascending=False)
    table = table[sorted(table.columns, reverse=True)]
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(5.5, 3.4), constrained_layout=True)
        im = ax.imshow(100 * table.to_numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(table.columns)), [f"{100 * d:.3g}" for d in table.columns], rotation=45)
        ax.set_yticks(range(len(table.index)), [str(b) for b in table.index])
        for (i, j), v in np.ndenumerate(100 * table.to_numpy()):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xlabel("weights remaining (%)")
        ax.set_ylabel("weight bits")
        ax.set_title(f"quantized ticket test accuracy{f' ({method})' if method else ''}")
        fig.colorbar(im, ax=ax, label="test accuracy (%)")
    fig.heatmap_table = table  # the plotted values, for checks and tables
    return fig


POINT_KEYS = ["run_id", "arm", "level", "bits", "method", "scheme", "granularity", "calibration", "act_bits"]


def compression_points(df: pd.DataFrame) -> pd.DataFrame:
    """Every (run, arm, level, bits, method, ...) point of a :func:`analysis.load_runs` table with a
    size: mean compressed bytes and test accuracy with its seed spread. Float networks are the
    ``bits = 32`` points (final accuracy, size of the float32 network stored sparse); the dense level
    0 is the arm ``dense``."""
    from .runs import float_rows, quant_rows
    from .summary import final_rows

    last = final_rows(float_rows(df))
    rows = pd.concat([last, quant_rows(df)], ignore_index=True).dropna(subset=["size_bytes"])
    if rows.empty:
        return pd.DataFrame(columns=POINT_KEYS + ["size_bytes", "density", "accuracy", "low", "high", "seeds", "rule"])
    rows = rows.assign(arm=np.where(rows["level"] == 0, "dense", rows["arm"]))
    out = []
    for key, g in rows.groupby(POINT_KEYS, sort=False, dropna=False):
        mean, lo, hi, rule = seed_spread(g["accuracy"])
        out.append({**dict(zip(POINT_KEYS, key)), "size_bytes": float(g["size_bytes"].mean()),
                    "density": float(g["density"].mean()), "accuracy": mean, "low": lo, "high": hi,
                    "seeds": int(g["seed"].nunique()), "rule": rule})
    return pd.DataFrame(out)


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """The points no smaller point beats in accuracy (sorted by size)."""
    p = points.sort_values(["size_bytes", "accuracy"], ascending=[True, False])
    return p[p["accuracy"] > p["accuracy"].cummax().shift(fill_value=-np.inf)]


def accuracy_vs_size(df: pd.DataFrame) -> plt.Figure:
    """Test accuracy vs compressed size in bytes (log x): every arm x bit width as points with seed
    spread, and the Pareto front: the large-sparse vs small-dense comparison at equal bytes."""
    points = compression_points(df)
    front = pareto_front(points)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
        for arm in [a for a in ARM_STYLE if a in set(points["arm"])]:
            g = points[points["arm"] == arm]
            st = ARM_STYLE[arm]
            for bits, b in g.groupby("bits"):
                ax.errorbar(b["size_bytes"], 100 * b["accuracy"],
                            yerr=[100 * (b["accuracy"] - b["low"]), 100 * (b["high"] - b["accuracy"])],
                            fmt=BITS_MARKER.get(int(bits), "o"), color=st["color"], markersize=4, capsize=1.5,
                            alpha=0.8, linewidth=0.8)
        ax.step(front["size_bytes"], 100 * front["accuracy"], where="post", color="grey", linewidth=1,
                label="Pareto front")
        handles = [plt.Line2D([], [], color=ARM_STYLE[a]["color"], marker="o", linestyle="", label=ARM_STYLE[a]["label"])
                   for a in ARM_STYLE if a in set(points["arm"])]
        handles += [plt.Line2D([], [], color="grey", marker=BITS_MARKER.get(int(b), "o"), linestyle="",
                               label="float32" if b == 32 else f"{int(b)}-bit") for b in sorted(set(points["bits"]),
                                                                                               reverse=True)]
        handles.append(plt.Line2D([], [], color="grey", label="Pareto front"))
        ax.set_xscale("log")
        ax.set_xlabel("compressed size (bytes)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{_title(df)}: accuracy at equal compressed size")
        rules = sorted(set(points["rule"]))
        ax.legend(handles=handles, fontsize=7, ncol=2, title="error bars: " + "; ".join(rules), title_fontsize=7)
    fig.pareto_front = front
    fig.points = points
    return fig


def accuracy_vs_bits(df: pd.DataFrame, max_densities: int = 3) -> plt.Figure:
    """Test accuracy vs weight bits per arm, at a few densities (one panel each; dense at 100%)."""
    points = compression_points(df)
    points = points[points["method"].isin(["float", "ptq", "qat"])]
    levels = sorted(points["level"].unique())
    quantized_levels = sorted(points.loc[points["bits"] < 32, "level"].unique())
    pick = quantized_levels or levels
    if len(pick) > max_densities:
        pick = [pick[i] for i in np.linspace(0, len(pick) - 1, max_densities).round().astype(int)]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(pick), figsize=(3.2 * len(pick), 3.2), constrained_layout=True,
                                 sharey=True, squeeze=False)
        for ax, level in zip(axes[0], pick):
            g = points[points["level"] == level]
            for (arm, method), a in g[g["bits"] < 32].groupby(["arm", "method"]):
                a = pd.concat([g[(g["arm"] == arm) & (g["bits"] == 32)], a]).sort_values("bits")
                st = ARM_STYLE.get(arm, {"label": arm})
                ax.errorbar(np.log2(a["bits"]), 100 * a["accuracy"],
                            yerr=[100 * (a["accuracy"] - a["low"]), 100 * (a["high"] - a["accuracy"])],
                            color=st.get("color"), marker=st.get("marker", "o"), markersize=4, capsize=1.5,
                            linestyle="-" if method == "qat" else "--", label=f"{st['label']} ({method})")
            ticks = sorted(set(g["bits"]))
            ax.set_xticks(np.log2(ticks), [str(int(b)) for b in ticks])
            ax.set_xlabel("weight bits")
            ax.set_title(f"{100 * g['density'].mean():.3g}% weights (level {level})")
        axes[0][0].set_ylabel("test accuracy (%)")
        axes[0][-1].legend(fontsize=6, title="; ".join(sorted(set(points["rule"]))), title_fontsize=6)
    return fig


def smallest_within(df: pd.DataFrame, tolerance: float = 0.01) -> pd.DataFrame:
    """Per arm: the smallest model within ``tolerance`` of the dense float network's test accuracy, at
    equal training (QAT judged against its float_ft control); see :func:`analysis.fair.smallest_within`."""
    from .fair import smallest_within as fair_smallest_within

    return fair_smallest_within(df, tolerance)


FORMAT_STYLE = {
    "dense": dict(color="k", marker="o", label="dense + mask"),
    "bcoo": dict(color="#1f77b4", marker="s", label="BCOO (jax.experimental.sparse)"),
    "csr": dict(color="#2ca02c", marker="^", label="CSR (scipy.sparse)"),
    "compact": dict(color="#ff7f0e", marker="D", label="compact (structured)"),
    "int8": dict(color="#9467bd", marker="v", label="int8 program"),
    "nm": dict(color="#d62728", marker="P", label="N:M"),
}


def latency_vs_density(speed: pd.DataFrame, crossover: pd.DataFrame | None = None) -> plt.Figure:
    """Latency per call vs weights remaining, one line per format, one panel per batch size; a
    dotted vertical line marks each format's crossover density (where it starts to beat dense)."""
    batches = sorted(speed["batch"].unique())
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.4), constrained_layout=True,
                                 squeeze=False)
        for ax, b in zip(axes[0], batches):
            d = speed[speed["batch"] == b]
            g = d.groupby(["format", "density"])["latency_s"].min().reset_index()
            order = [f for f in FORMAT_STYLE if f in set(g["format"])] + sorted(set(g["format"]) - set(FORMAT_STYLE))
            for f in order:
                h = g[g["format"] == f].sort_values("density", ascending=False)
                st = FORMAT_STYLE.get(f, dict(label=f))
                ax.plot(h["density"], 1e3 * h["latency_s"], markersize=4, **st)
                if crossover is not None and f != "dense":
                    c = crossover[(crossover["format"] == f) & (crossover["batch"] == b)]["crossover_density"]
                    if len(c) and np.isfinite(c.min()):
                        ax.axvline(float(c.max()), color=st.get("color"), linestyle=":", linewidth=1)
            _density_axis(ax, g["density"])
            ax.set_yscale("log")
            ax.set_ylabel("latency per batch (ms)")
            ax.set_title(f"batch {b}")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{_title(speed)}: inference latency vs sparsity (dotted: crossover)")
    return fig


# ---------------------------------------------------------------------------- linear mode connectivity

def _stage_rows(stability: pd.DataFrame) -> pd.DataFrame:
    return stability[stability["source"] == "stage"] if "source" in stability else stability


def _band(ax, x, groups, style: dict, label: str) -> str:
    """Mean line and seed spread band (summary.seed_spread) of ``groups``: x -> values over seeds."""
    stats = [seed_spread(v) for v in groups]
    mean, lo, hi = (np.array([s[i] for s in stats]) for i in range(3))
    ax.plot(x, mean, color=style.get("color"), marker=style.get("marker"), ms=3, label=label)
    ax.fill_between(x, lo, hi, color=style.get("color"), alpha=0.15, lw=0)
    return stats[0][3] if stats else ""


def error_along_path(stability: pd.DataFrame, max_levels: int = 4) -> plt.Figure:
    """Test error along the linear path between the two copies (Frankle et al. 2020, Fig. 1), one panel
    per level (a few levels), one line per arm: mean and seed spread (summary.seed_spread)."""
    d = _stage_rows(stability)
    levels = sorted(d["level"].unique())
    if len(levels) > max_levels:
        levels = [levels[i] for i in np.linspace(0, len(levels) - 1, max_levels).round().astype(int)]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(levels), figsize=(2.6 * len(levels) + 0.6, 2.9), sharey=True,
                                 constrained_layout=True, squeeze=False)
        rule = ""
        for ax, lv in zip(axes[0], levels):
            g = d[d["level"] == lv]
            for arm in [a for a in ARM_STYLE if a in set(g["arm"])] + sorted(set(g["arm"]) - set(ARM_STYLE)):
                ga = g[g["arm"] == arm]
                by = ga.groupby("alpha")["test_error"]
                style = ARM_STYLE.get(arm, {}) if lv > 0 else ARM_STYLE["dense"]
                rule = _band(ax, by.mean().index, [100 * v.to_numpy() for _, v in by], style,
                             style.get("label", arm)) or rule
            ax.set_title(f"level {lv}: {100 * g['density'].mean():.3g}% weights")
            ax.set_xlabel("interpolation alpha")
        axes[0][0].set_ylabel("test error (%)")
        axes[0][-1].legend(title=f"mean and {rule}", title_fontsize=7, fontsize=7)
        fig.suptitle(f"{_title(stability)}: error along the path between two copies")
    return fig


def instability_vs_density(stability: pd.DataFrame) -> plt.Figure:
    """Instability (error barrier, percentage points) vs weights remaining, one line per arm; the
    dense level 0 starts every arm's line."""
    from .runs import instability_table
    t = instability_table(_stage_rows(stability))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        dense = t[t["level"] == 0]
        rule = ""
        for arm in [a for a in ARM_STYLE if a in set(t["arm"])] + sorted(set(t["arm"]) - set(ARM_STYLE)):
            g = pd.concat([dense, t[(t["arm"] == arm) & (t["level"] > 0)]]) if arm != "ticket" else t[t["arm"] == arm]
            if g.empty or (arm != "ticket" and not (g["level"] > 0).any()):
                continue
            by = g.groupby("density", sort=True)["instability"]
            x = by.mean().index.to_numpy()[::-1]
            vals = [100 * v.to_numpy() for _, v in by][::-1]
            rule = _band(ax, x, vals, ARM_STYLE.get(arm, {}), ARM_STYLE.get(arm, {}).get("label", arm)) or rule
        _density_axis(ax, t["density"])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel("instability (error barrier, pp)")
        ax.set_title(f"{_title(stability)}: instability vs sparsity")
        ax.legend(title=f"mean and {rule}", title_fontsize=8)
    return fig


def instability_vs_rewind(stability: pd.DataFrame) -> plt.Figure:
    """Instability vs rewind step k (``lth stability``), one line per (level, arm)."""
    from .runs import instability_table
    t = instability_table(stability[stability["source"] == "rewind"])
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        rule = ""
        for i, ((lv, arm), g) in enumerate(t.groupby(["level", "arm"], sort=True)):
            by = g.groupby("rewind_step", sort=True)["instability"]
            style = dict(ARM_STYLE.get(arm, {}) if lv > 0 else ARM_STYLE["dense"])
            label = f"{style.get('label', arm)}, {100 * g['density'].mean():.3g}% weights"
            if t["level"].nunique() > 1:  # one colour per (level, arm), line and band alike
                style["color"] = f"C{i % 10}"
            rule = _band(ax, by.mean().index.to_numpy(), [100 * v.to_numpy() for _, v in by], style, label) or rule
        ax.set_xscale("symlog", linthresh=max(1, float(t["rewind_step"][t["rewind_step"] > 0].min())
                                            if (t["rewind_step"] > 0).any() else 1))
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("rewind step k (iterations)")
        ax.set_ylabel("instability (error barrier, pp)")
        ax.set_title(f"{_title(stability)}: instability vs rewind step")
        ax.legend(title=f"mean and {rule}", title_fontsize=8)
    return fig
