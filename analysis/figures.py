"""Paper figures from the tidy runs DataFrame. Each function returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .summary import is_language_model, seed_spread, spread_rule, summarize  # noqa: E402,F401 - public here too

# Okabe & Ito (2008), "Color universal design": eight colours told apart with every common colour-vision
# deficiency; grey is the ninth for arms beyond them. Every figure takes its colours from here.
OKABE_ITO = {"blue": "#0072B2", "vermillion": "#D55E00", "bluish_green": "#009E73", "reddish_purple": "#CC79A7",
             "orange": "#E69F00", "sky_blue": "#56B4E9", "yellow": "#F0E442", "black": "#000000"}
GREY = "#999999"
PALETTE = [OKABE_ITO[c] for c in ("blue", "vermillion", "bluish_green", "reddish_purple", "orange", "sky_blue",
                                  "black", "yellow")]
MARKERS = ["o", "s", "^", "v", "D", "P", "X", "h", "<", ">"]
LINESTYLES = ["-", "--", ":", "-."]

# One style per arm, the same in every figure (accuracy, quantization, stability, masks): a family of
# arms shares one Okabe-Ito hue and its variants differ by marker and line style, and no two arms share
# (colour, marker) (so a figure that draws runs apart by line style still tells every arm apart):
# IMP and its controls one hue each; pruning at init (SNIP, GraSP, SynFlow; shuffles: the outline marker,
# dashed) sky blue; one-shot pruning of the trained dense network (magnitude, Wanda, SparseGPT: dashed;
# fine-tuned: the mirrored or fuller marker, dash-dot) black, the dense network's hue; sparse from scratch
# (static, SET, RigL) grey.
_FAMILY_PAI, _FAMILY_ONESHOT, _FAMILY_DST = OKABE_ITO["sky_blue"], OKABE_ITO["black"], GREY
ARM_STYLE = {
    "ticket": dict(color=OKABE_ITO["blue"], marker="o", linestyle="-", label="winning ticket"),
    "reinit": dict(color=OKABE_ITO["vermillion"], marker="s", linestyle="-", label="random reinit"),
    "random_prune": dict(color=OKABE_ITO["bluish_green"], marker="^", linestyle="-", label="random pruning"),
    "shuffle": dict(color=OKABE_ITO["reddish_purple"], marker="v", linestyle="-", label="shuffled mask"),
    "small_dense": dict(color=OKABE_ITO["orange"], marker="D", linestyle="-", label="small dense"),
    "dense": dict(color=OKABE_ITO["black"], marker="*", linestyle="-", label="dense (level 0)"),
    "snip": dict(color=_FAMILY_PAI, marker="P", linestyle="-", label="SNIP"),
    "grasp": dict(color=_FAMILY_PAI, marker="X", linestyle="-", label="GraSP"),
    "synflow": dict(color=_FAMILY_PAI, marker="h", linestyle="-", label="SynFlow"),
    "snip_shuffle": dict(color=_FAMILY_PAI, marker="+", linestyle="--", label="SNIP, shuffled per layer"),
    "grasp_shuffle": dict(color=_FAMILY_PAI, marker="x", linestyle="--", label="GraSP, shuffled per layer"),
    "synflow_shuffle": dict(color=_FAMILY_PAI, marker="H", linestyle="--", label="SynFlow, shuffled per layer"),
    "static": dict(color=_FAMILY_DST, marker="s", linestyle=":", label="static sparse (fixed mask from init)"),
    "set": dict(color=_FAMILY_DST, marker="D", linestyle="--", label="SET (random regrowth)"),
    "rigl": dict(color=_FAMILY_DST, marker="p", linestyle="-", label="RigL (gradient regrowth)"),
    "oneshot_magnitude": dict(color=_FAMILY_ONESHOT, marker="v", linestyle="--", label="one-shot magnitude"),
    "wanda": dict(color=_FAMILY_ONESHOT, marker="<", linestyle="--", label="Wanda (one-shot)"),
    "sparsegpt": dict(color=_FAMILY_ONESHOT, marker="d", linestyle="--", label="SparseGPT (one-shot)"),
    "oneshot_magnitude_ft": dict(color=_FAMILY_ONESHOT, marker="^", linestyle="-.",
                                 label="one-shot magnitude, fine-tuned"),
    "wanda_ft": dict(color=_FAMILY_ONESHOT, marker=">", linestyle="-.", label="Wanda, fine-tuned"),
    "sparsegpt_ft": dict(color=_FAMILY_ONESHOT, marker="D", linestyle="-.", label="SparseGPT, fine-tuned"),
}
ARM_COLOR = {arm: st["color"] for arm, st in ARM_STYLE.items()}
PAI_ARMS = ("snip", "grasp", "synflow", "snip_shuffle", "grasp_shuffle", "synflow_shuffle")
BITS_MARKER = {32: "o", 8: "s", 4: "^", 3: "v", 2: "D", 1: "x"}
# quantization methods: each its own marker and line style (PTQ and QAT are different models)
METHOD_STYLE = {"float": dict(marker="o", linestyle="-", fillstyle="full", label="float"),
                "ptq": dict(marker="s", linestyle="--", fillstyle="none", label="PTQ"),
                "qat": dict(marker="o", linestyle="-", fillstyle="full", label="QAT"),
                "gptq": dict(marker="^", linestyle="-.", fillstyle="none", label="GPTQ"),
                "sparsegpt_gptq": dict(marker="v", linestyle="-.", fillstyle="full", label="SparseGPT + GPTQ"),
                "float_ft": dict(marker="*", linestyle=":", fillstyle="full", label="float, fine-tuned as QAT")}


def _stable_index(name: str, n: int) -> int:
    import zlib
    return zlib.crc32(str(name).encode()) % n


def arm_color(arm: str) -> str:
    """The arm's colour in every figure: :data:`ARM_COLOR`, or a palette colour fixed by the name."""
    return ARM_COLOR.get(arm) or PALETTE[_stable_index(arm, len(PALETTE))]


def arm_style(arm: str) -> dict:
    """Colour, marker and label of an arm (any name: arms outside :data:`ARM_STYLE` get a fixed colour
    and marker from their name)."""
    if arm in ARM_STYLE:
        return dict(ARM_STYLE[arm])
    return dict(color=arm_color(arm), marker=MARKERS[_stable_index(arm, len(MARKERS))], label=str(arm))


def method_style(method: str) -> dict:
    """Marker, line style, fill and label of a quantization method (any name)."""
    if method in METHOD_STYLE:
        return dict(METHOD_STYLE[method])
    i = _stable_index(method, len(MARKERS))
    return dict(marker=MARKERS[i], linestyle=LINESTYLES[i % len(LINESTYLES)], fillstyle="left", label=str(method))


def _arms_in(arms) -> list[str]:
    arms = set(arms)
    return [a for a in ARM_STYLE if a in arms] + sorted(arms - set(ARM_STYLE))


STYLE = {"font.size": 10, "axes.labelsize": 10, "axes.titlesize": 11, "legend.fontsize": 9,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.grid": True, "grid.alpha": 0.3,
         "pdf.fonttype": 42, "ps.fonttype": 42, "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
         "image.cmap": "viridis"}


def say_missing(ax, text: str) -> None:
    """Write in ``ax`` what the figure would need (instead of leaving empty axes)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8, wrap=True,
            bbox=dict(boxstyle="round", facecolor="white", edgecolor=GREY))
    ax.missing = text


def evaluations_per_level(df: pd.DataFrame) -> int:
    """The most evaluation steps any (run, arm, seed, level) has on one split (float rows)."""
    d = df[df["method"] == "float"] if "method" in df else df
    if d.empty:
        return 0
    return int(d.groupby(["run_id", "arm", "seed", "level", "split"])["step"].nunique().max())


def _too_few_evals(df: pd.DataFrame, what: str) -> str | None:
    n = evaluations_per_level(df)
    if n >= 2:
        return None
    steps = sorted(set(df["step"].dropna().astype(int))) if "step" in df else []
    at = f" (step {steps[-1]})" if steps else ""
    return (f"{n} evaluation per level{at}: too few for {what}.\nSet train.eval_every below the steps "
            "of a level\n(e.g. steps / 10) and rerun.")


def density_axis(ax, densities) -> None:
    """Log x axis of weights remaining (%), 100% on the left."""
    ax.set_xscale("log")
    ax.invert_xaxis()
    ticks = sorted(set(np.round(densities, 3)), reverse=True)
    if len(ticks) > 8:
        ticks = ticks[:: max(1, len(ticks) // 8)]
    kept = []  # ticks of several runs may lie close together: keep one label where they would overlap
    for t in ticks:
        if not kept or kept[-1] / max(t, 1e-12) > 1.12:
            kept.append(t)
    ticks = kept
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{100 * t:.3g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("weights remaining (%)")


_density_axis = density_axis


def _arm_lines(ax, summary: pd.DataFrame, y: str, scale: float = 1.0, labels: dict | None = None) -> None:
    """One line + band per (run, arm): members of different runs are never averaged together. Colour:
    the arm; line style: the run (labelled by ``labels``, run_id -> its swept settings, when the axes
    hold several runs). Controls start from their run's dense network (level 0)."""
    runs = list(dict.fromkeys(summary["run_id"]))
    for r_i, run_id in enumerate(runs):
        s = summary[summary["run_id"] == run_id]
        dense = s[s["level"] == 0]
        for arm in _arms_in(s["arm"]):
            g = s[s["arm"] == arm]
            if arm != "ticket" and not (g["level"] == 0).any():
                g = pd.concat([dense, g])
            g = g.sort_values("density", ascending=False)
            st = arm_style(arm)
            if len(runs) > 1:
                st["linestyle"] = LINESTYLES[r_i % len(LINESTYLES)]
                st["label"] = f"{st['label']} ({(labels or {}).get(run_id, run_id)})"
            mean = g[f"{y}_mean"].to_numpy() * scale
            lo, hi = g[f"{y}_spread_low"].to_numpy() * scale, g[f"{y}_spread_high"].to_numpy() * scale
            line, = ax.plot(g["density"], mean, markersize=4, **st)
            line.run_id, line.arm = run_id, arm  # what the line draws, for checks
            ax.fill_between(g["density"], lo, hi, color=st.get("color"), alpha=0.2, linewidth=0)
            if "diverged" in g and (g["diverged"] > 0).any():  # a seed whose loss diverged: a black cross
                bad = (g["diverged"] > 0).to_numpy()
                first = not any(c.get_label() == "diverged" for c in ax.collections)
                ax.scatter(g["density"][bad], mean[bad], marker="x", s=50, color="black", zorder=5,
                           label="diverged" if first else "_nolegend_")


def _facets(df: pd.DataFrame, by: str | None) -> list[tuple[str, pd.DataFrame]]:
    """(panel title, rows) per value of the setting ``by`` (one panel of every row when None)."""
    if by is None:
        return [("", df)]
    if by not in df.columns:
        from .runs import swept_keys
        raise ValueError(f"--by {by}: not a setting of these runs; settings that differ between them: "
                         f"{', '.join(swept_keys(df)) or 'none (one run)'}")
    values = sorted(df[by].drop_duplicates(), key=repr)
    return [(f"{by} = {v}", df[df[by].map(repr) == repr(v)]) for v in values]


def _panels(n: int, width: float = 5, height: float = 3.4):
    fig, axes = plt.subplots(1, n, figsize=(width * n if n == 1 else (width - 0.8) * n + 0.8, height),
                             constrained_layout=True, sharey=True, squeeze=False)
    return fig, list(axes[0])


def _density_figure(df: pd.DataFrame, y: str, scale: float, ylabel: str, title: str, split: str = "test",
                    by: str | None = None, dense_line: bool = False, legend_size: float = 9,
                    select: str = "accuracy") -> plt.Figure:
    """Summary statistic ``y`` vs weights remaining, one line per (run, arm), one panel per value of ``by``;
    ``select``: how the early-stop step is chosen on validation (:func:`analysis.summary.summarize`)."""
    from .runs import run_labels, swept_keys
    keys = [k for k in swept_keys(df) if k != by]
    labels = run_labels(df, keys)
    facets = _facets(df, by)
    with plt.rc_context(STYLE):
        fig, axes = _panels(len(facets))
        for ax, (name, part) in zip(axes, facets):
            s = summarize(part, split=split, select=select)
            _arm_lines(ax, s, y, scale=scale, labels=labels)
            if dense_line:
                _dense_reference(ax, s, y, scale, labels)
            _density_axis(ax, s["density"])
            ax.set_title(name, fontsize=9)
        axes[0].set_ylabel(ylabel)
        if len(axes) == 1:  # the axes' own title: a figure title would run into a legend beside the axes
            axes[0].set_title(f"{_title(df)}: {title}")
        else:
            fig.suptitle(f"{_title(df)}: {title}", fontsize=11)
        handles, names = axes[-1].get_legend_handles_labels()
        if len(handles) > 5:  # beside the axes, never over the curves
            w, h = fig.get_size_inches()
            fig.set_size_inches(w + 2.8, h)
            fig.legend(handles, names, loc="outside right center", title=_seeds_note(summarize(df, split=split)),
                       title_fontsize=8, fontsize=min(legend_size, 7))
        else:
            axes[-1].legend(title=_seeds_note(summarize(df, split=split)), title_fontsize=8, fontsize=legend_size)
    return fig


def _dense_reference(ax, s: pd.DataFrame, y: str, scale: float, labels: dict) -> None:
    """A dotted horizontal line at each run's dense network (level 0): the accuracy to keep."""
    dense = s[s["level"] == 0].drop_duplicates("run_id")
    values = dense[f"{y}_mean"].round(9)
    for r_i, (v, runs) in enumerate(dense.groupby(values, sort=False)["run_id"]):  # runs sharing a dense net: one line
        many = values.nunique() > 1
        line = ax.axhline(float(v) * scale, color=ARM_COLOR["dense"], linewidth=1, linestyle=(0, (1, 2 + r_i)),
                          label="dense (100% weights)" + (f" ({', '.join(labels.get(r, r) for r in runs)})"
                                                          if many else ""))
        line.run_id, line.arm = runs.iloc[0], "dense"


def _seeds_note(summary: pd.DataFrame) -> str:
    n = sorted(set(summary["seeds"].astype(int)))
    if len(n) == 1 or n[-1] < 3 or n[0] >= 3:
        rule = spread_rule(n[-1]) if len(n) == 1 else spread_rule(n[-1]).replace(str(n[-1]), f"{n[0]}-{n[-1]}", 1)
        return f"mean and {rule}"
    return f"mean and min-max (below 3 seeds) or 95% CI ({n[0]}-{n[-1]} seeds)"


def accuracy_vs_density(df: pd.DataFrame, split: str = "test", metric: str = "final", by: str | None = None
                        ) -> plt.Figure:
    """Final (or best) test accuracy vs weights remaining, one line + seed band per arm and run, and a
    dotted line at the dense network (LTH Fig. 3); one panel per value of the setting ``by``."""
    return _density_figure(df, f"{metric}_accuracy", 100, f"{metric} {split} accuracy (%)",
                           f"{split} accuracy vs weights remaining", split, by, dense_line=True)


def bits_per_byte_vs_density(df: pd.DataFrame, split: str = "test", metric: str = "final", by: str | None = None
                             ) -> plt.Figure:
    """A language model's :func:`accuracy_vs_density`: ``split`` bits per byte (lower is better) at the end of
    training (``metric="final"``) or at the early-stop step (``"early_stop_test"``: minimum validation loss)."""
    what = "early-stop" if metric.startswith("early_stop") else "final"
    return _density_figure(df, f"{metric}_bits_per_byte", 1, f"{what} {split} bits per byte (lower is better)",
                           f"{split} bits per byte vs weights remaining", split, by, dense_line=True, select="loss")


def pai_accuracy_vs_density(df: pd.DataFrame, split: str = "test", by: str | None = None) -> plt.Figure:
    """Final accuracy vs weights remaining of the pruning-at-init arms (and their layerwise shuffles,
    dashed) beside the ticket and random pruning at the same per-layer counts."""
    keep = ("ticket", "random_prune", *PAI_ARMS)
    return _density_figure(df[df["arm"].isin(keep)], "final_accuracy", 100, f"final {split} accuracy (%)",
                           "pruning at init vs ticket (weights remaining)", split, by, dense_line=True, legend_size=7)


def early_stop_vs_density(df: pd.DataFrame, by: str | None = None) -> plt.Figure:
    """Early-stopping step (peak validation accuracy) vs weights remaining, per arm (LTH Fig. 3). With
    fewer than 2 evaluations per level the step can only be the last one: the axes say so instead."""
    missing = _too_few_evals(df, "an early-stopping step")
    if missing is None:
        fig = _density_figure(df, "early_stop_step", 1, "early-stop step (iterations)",
                              "early-stopping step vs weights remaining", by=by)
        d = df[(df["method"] == "float") if "method" in df else slice(None)]
        last = d.groupby(["run_id", "arm", "seed", "level"])["step"].transform("max")
        if len(d) and (d["early_stop_step"] == last).all():  # flat at the end: say why
            for ax in fig.axes[:1]:
                ax.text(0.02, 0.04, "every early-stop step is the member's last evaluation:\nstill improving "
                        "when training ended (train longer to see an early stop)", transform=ax.transAxes,
                        fontsize=7, va="bottom", bbox=dict(boxstyle="round", facecolor="white", edgecolor=GREY))
        return fig
    return _missing_figure(missing, f"{_title(df)}: early-stopping step vs weights remaining")


def _missing_figure(text: str, title: str) -> plt.Figure:
    """One empty frame that says what the figure would need."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        say_missing(ax, text)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        ax.set_title(title)
    return fig


def learning_curves(df: pd.DataFrame, arm: str = "ticket", split: str = "test", max_levels: int = 4,
                    control: str = "reinit", metric: str = "accuracy") -> plt.Figure:
    """Accuracy (or ``metric="bits_per_byte"``: a language model's, lower is better) vs training step of
    ``arm`` (solid) and its ``control`` (dashed, where the run has it) at a few levels, one panel per level
    and one row per run: mean and seed band."""
    scale, ylabel = ((1, f"{split} bits per byte (lower is better)") if metric == "bits_per_byte"
                     else (100, f"{split} accuracy (%)"))
    d = df[(df["split"] == split) & ((df["method"] == "float") if "method" in df else True)]
    runs = list(dict.fromkeys(d["run_id"])) or [""]
    levels = sorted(d[d["arm"] == arm]["level"].unique())
    if len(levels) > max_levels:
        levels = [levels[i] for i in np.linspace(0, len(levels) - 1, max_levels).round().astype(int)]
    levels = levels or [0]
    missing = _too_few_evals(d, "learning curves")
    if missing:
        return _missing_figure(missing, f"{_title(df)}: learning curves")
    from .runs import run_labels
    labels = run_labels(df) if len(runs) > 1 else {}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(runs), len(levels), figsize=(2.7 * len(levels) + 0.8, 2.8 * len(runs)),
                                 sharey=True, constrained_layout=True, squeeze=False)
        rule = ""
        for row, run_id in zip(axes, runs):
            r = d[d["run_id"] == run_id]
            for ax, lv in zip(row, levels):
                g = r[r["level"] == lv]
                title = f"level {lv}: {100 * g['density'].mean():.3g}% weights" if len(g) else f"level {lv}"
                ax.set_title((f"{labels[run_id]}\n" if run_id in labels else "") + title, fontsize=9)
                if missing:
                    say_missing(ax, missing)
                    continue
                for a in [arm] + ([control] if control != arm and lv > 0 else []):
                    ga = g[g["arm"] == a]
                    if ga.empty:
                        continue
                    by = ga.groupby("step", sort=True)[metric]
                    st = arm_style(a) if lv > 0 else arm_style("dense")
                    st["marker"] = None
                    st["linestyle"] = "-" if a == arm else "--"
                    rule = _band(ax, by.mean().index.to_numpy(), [scale * v.to_numpy() for _, v in by], st,
                                 st["label"]) or rule
                ax.set_xlabel("training step")
            row[0].set_ylabel(ylabel)
        handles = [plt.Line2D([], [], color=arm_color(arm), label=arm_style(arm)["label"])]
        if (d["arm"] == control).any() and control != arm:
            handles.append(plt.Line2D([], [], color=arm_color(control), linestyle="--",
                                      label=arm_style(control)["label"]))
        if 0 in levels:
            handles.append(plt.Line2D([], [], color=arm_color("dense"), label="dense (level 0)"))
        if not missing:
            axes[0][-1].legend(handles=handles, title=f"mean and {rule}" if rule else None, title_fontsize=7,
                               fontsize=7)
        fig.suptitle(f"{_title(df)}: learning curves, {arm_style(arm)['label']} vs {arm_style(control)['label']}",
                     fontsize=10)
    return fig


def _title(df: pd.DataFrame) -> str:
    names = df["experiment"].unique() if "experiment" in df else []
    return ", ".join(map(str, names)) or "lth"


def _one_run(df: pd.DataFrame, what: str) -> None:
    """ValueError unless ``df`` holds one run: ``what`` would pool members of different runs."""
    if "run_id" in df and df["run_id"].nunique() > 1:
        raise ValueError(f"{what} draws one run; got {df['run_id'].nunique()} "
                         f"({', '.join(sorted(map(str, df['run_id'].unique())))}): select one, e.g. "
                         "df[df.run_id == ...]")


def layer_density_profile(sparsity: pd.DataFrame, arm: str = "ticket") -> plt.Figure:
    """Density of each prunable layer across IMP levels (mean over seeds), from sparsity tables. Layers
    pruned alike would lie on one another: each has its own marker and line style, and the layers are
    spread a little along x about each level."""
    _one_run(sparsity, "layer_density_profile")
    d = sparsity[(sparsity["arm"] == arm) & sparsity["prunable"]]
    table = d.groupby(["level", "layer"], sort=True)["density"].mean().unstack("layer")
    n = len(table.columns)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        for i, layer in enumerate(table.columns):
            offset = (i - (n - 1) / 2) * min(0.08, 0.5 / max(1, n))
            ax.plot(table.index + offset, 100 * table[layer].to_numpy(), marker=MARKERS[i % len(MARKERS)],
                    linestyle=LINESTYLES[i % len(LINESTYLES)], color=PALETTE[i % len(PALETTE)], markersize=4,
                    label=layer)
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        lo, hi = ax.get_ylim()
        ax.yaxis.set_minor_formatter(plain if hi / max(lo, 1e-12) < 10 else matplotlib.ticker.NullFormatter())
        ax.set_xticks(table.index)
        ax.set_xlabel("IMP level (layers spread about each level)")
        ax.set_ylabel("weights remaining in layer (%)")
        ax.set_title(f"per-layer density ({arm_style(arm)['label']})")
        ax.legend(fontsize=7, ncol=2)
    return fig


def sparse_vs_dense(df: pd.DataFrame, split: str = "test") -> plt.Figure:
    """Final accuracy vs non-zero parameter count: large-sparse tickets vs small-dense models."""
    _one_run(df, "sparse_vs_dense")
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
    """Accuracy (a language model: bits per byte) when one layer alone is pruned to each density (no
    retraining), one line per layer."""
    t = table[table["split"] == split]
    bpb = "metric" in t and len(t) and t["metric"].iloc[0] == "bits_per_byte"
    col, scale = ("bits_per_byte", 1) if bpb else ("accuracy", 100)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        for i, (layer, g) in enumerate(t.groupby("layer", sort=True)):
            g = g.sort_values("density", ascending=False)
            ax.plot(g["density"], scale * g[col], marker=MARKERS[i % len(MARKERS)],
                    linestyle=LINESTYLES[i % len(LINESTYLES)], markersize=3, label=layer)
        if len(t):
            ax.axhline(scale * t[f"base_{col}"].iloc[0], color="grey", linestyle="--", linewidth=1, label="unpruned")
        _density_axis(ax, t["density"])
        ax.set_xlabel("weights remaining in the pruned layer (%)")
        ax.set_ylabel(f"{split} bits per byte (lower is better)" if bpb else f"{split} accuracy (%)")
        ax.set_title("layer-wise pruning sensitivity (no retraining)")
        ax.legend(fontsize=7)
    return fig


# the columns of a quant row that tell two quantized models apart (besides run, arm, level, seed and bits):
# no figure averages over them
QUANT_SETTING = ["method", "scheme", "granularity", "calibration", "act_bits", "act_order", "act_scheme", "bias_correction", "cle",
                 "learned_scale", "qat_start", "qat_steps", "qat_lr", "retry"]
# what a float_ft row shares with the QAT rows it is the control of (QAT's schedule)
QAT_SCHEDULE = ["qat_start", "qat_steps", "qat_lr"]


def quant_settings(quant: pd.DataFrame) -> pd.DataFrame:
    """One row per quantization setting in ``quant`` (the :data:`QUANT_SETTING` columns it has; a PTQ
    retry is one setting whatever calibration each seed kept), with ``setting``: a label naming the
    method and every key that differs between the settings."""
    q = _setting_frame(quant)
    cols = [c for c in QUANT_SETTING if c in q]
    if q.empty:
        return pd.DataFrame(columns=cols + ["setting"])
    out = q[cols].apply(_as_key).drop_duplicates()
    order = {m: i for i, m in enumerate(METHOD_STYLE)}
    out = out.sort_values(cols, key=lambda c: c.map(order).fillna(len(order)) if c.name == "method" else c)
    out = out.reset_index(drop=True)
    # name the keys that differ between settings of one method (QAT's schedule is no PTQ setting)
    varying = {m: [c for c in cols if c != "method" and g[c].nunique() > 1] for m, g in out.groupby("method")}
    out["setting"] = [method_style(r["method"])["label"] + "".join(f", {c} {r[c]}" for c in varying[r["method"]])
                      for _, r in out.iterrows()]
    return out


def _as_key(col: pd.Series) -> pd.Series:
    """A column as text to group by: missing values are "" (pandas' string type keeps NaN missing)."""
    return col.astype(object).where(col.notna(), "").map(lambda v: f"{v:.6g}" if isinstance(v, float) else str(v))


def _setting_frame(quant: pd.DataFrame) -> pd.DataFrame:
    q = quant.copy()
    if "calibration_requested" in q:  # a PTQ retry keeps a calibration per seed: the setting is the list tried
        q["calibration"] = q["calibration_requested"].where(q["calibration_requested"].notna(), q["calibration"])
    return q


def _of_setting(q: pd.DataFrame, setting: pd.Series) -> pd.DataFrame:
    cols = [c for c in QUANT_SETTING if c in setting.index]
    keep = np.ones(len(q), bool)
    for c in cols:
        keep &= (_as_key(q[c]) == setting[c]).to_numpy()
    return q[keep]


def _float_ft_of(q: pd.DataFrame, qat: pd.DataFrame) -> pd.DataFrame:
    """The float_ft rows (QAT's float control) with the schedule of the ``qat`` rows."""
    ft = q[q["method"] == "float_ft"]
    for c in QAT_SCHEDULE:
        if c in ft and c in qat and ft[c].notna().any() and qat[c].notna().any():
            ft = ft[_as_key(ft[c]).isin(set(_as_key(qat[c])))]
    return ft


def _text_color(rgba) -> str:
    """Black on light cells, white on dark ones (relative luminance, WCAG 2)."""
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    lum = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return "black" if lum > 0.179 else "white"


def quant_heatmap(quant: pd.DataFrame, method: str | None = None, arm: str = "ticket") -> plt.Figure:
    """Mean test accuracy over seeds of the quantized ``arm`` per (bits, weights remaining), one panel per
    quantization setting (method, scheme, granularity, calibration, ...: never averaged together), with a
    float row on top: the members' float accuracy, or for QAT its float_ft control where the store has it.
    ``fig.heatmap_tables``: setting label -> the plotted table (row 32 = float); ``fig.heatmap_table``: the
    first."""
    _one_run(quant, "quant_heatmap")
    quant = quant[quant["method"] != "float"]  # a load_runs table will do: its quant and float_ft rows
    q = _setting_frame(quant[quant["arm"] == arm])
    if method is not None:
        q = q[q["method"].isin([method, "float_ft"] if method == "qat" else [method])]
    settings = quant_settings(q[q["method"] != "float_ft"])
    tables, floats = {}, {}
    for _, st in settings.iterrows():
        rows = _of_setting(q, st)
        table = rows.groupby(["bits", "density"])["accuracy"].mean().unstack("density")
        ft = _float_ft_of(q, rows) if st["method"] == "qat" else q.iloc[:0]
        if not ft.empty:
            ref, name = ft.groupby("density")["accuracy"].mean(), "float, fine-tuned as QAT"
        else:
            members = rows.drop_duplicates(["run_id", "level", "seed"])
            ref, name = members.groupby("density")["float_accuracy"].mean(), "float"
        table.loc[32] = ref.reindex(table.columns)
        table = table.sort_index(ascending=False)
        tables[st["setting"]] = table[sorted(table.columns, reverse=True)]
        floats[st["setting"]] = name
    values = np.concatenate([t.to_numpy().ravel() for t in tables.values()]) if tables else np.array([np.nan])
    values = values[np.isfinite(values)]
    norm = matplotlib.colors.Normalize(100 * values.min(), 100 * values.max()) if len(values) else None
    with plt.rc_context({**STYLE, "axes.grid": False}):
        n = max(1, len(tables))
        fig, axes = plt.subplots(1, n, figsize=(4.3 * n + 1.2, 3.4), constrained_layout=True, squeeze=False)
        im = None
        for ax, (label, table) in zip(axes[0], tables.items()):
            im = ax.imshow(100 * table.to_numpy(), aspect="auto", cmap="viridis", norm=norm)
            ax.set_xticks(range(len(table.columns)), [f"{100 * d:.3g}" for d in table.columns], rotation=45)
            ax.set_yticks(range(len(table.index)), [floats[label] if b == 32 else f"{int(b)}-bit"
                                                    for b in table.index], fontsize=7)
            ax.axhline(0.5, color="white", linewidth=2)  # the float row apart from the quantized ones
            for (i, j), v in np.ndenumerate(100 * table.to_numpy()):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                            color=_text_color(im.cmap(im.norm(v))))
            ax.set_xlabel("weights remaining (%)")
            ax.set_title(label, fontsize=9)
        if im is not None:
            fig.colorbar(im, ax=list(axes[0]), label="test accuracy (%)")
        else:
            say_missing(axes[0][0], f"no quantized {arm} rows")
        fig.suptitle(f"quantized {arm_style(arm)['label']}: test accuracy (mean over seeds)", fontsize=10)
    fig.heatmap_tables = tables
    fig.heatmap_table = next(iter(tables.values())) if tables else pd.DataFrame()
    return fig


POINT_KEYS = ["run_id", "arm", "level", "bits", "method", "scheme", "granularity", "calibration", "act_bits",
              "act_order"]


def compression_points(df: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Every (run, arm, level, bits, method, ...) point of a :func:`analysis.load_runs` table with a
    size: mean compressed bytes and test accuracy with its seed spread. Float networks are the
    ``bits = 32`` points (final accuracy, size of the float32 network stored sparse); the dense level
    0 is the arm ``dense``. ``metric``: the column averaged (``bits_per_byte`` for a language model)."""
    from .runs import float_rows, quant_rows
    from .summary import final_rows

    last = final_rows(float_rows(df))
    rows = pd.concat([last, quant_rows(df)], ignore_index=True).dropna(subset=["size_bytes"])
    if rows.empty:
        return pd.DataFrame(columns=POINT_KEYS + ["size_bytes", "density", metric, "low", "high", "seeds", "rule"])
    rows = rows.assign(arm=np.where(rows["level"] == 0, "dense", rows["arm"]))
    if "act_order" not in rows:  # stores quantized before GPTQ's act_order existed
        rows = rows.assign(act_order=False)
    return _spread_points(rows, metric)


def _spread_points(rows: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """One row per :data:`POINT_KEYS` group: mean size, density and ``metric`` with its seed spread."""
    out = []
    for key, g in rows.groupby(POINT_KEYS, sort=False, dropna=False):
        mean, lo, hi, rule = seed_spread(g[metric] if metric in g else [])
        out.append({**dict(zip(POINT_KEYS, key)), "size_bytes": float(g["size_bytes"].mean()),
                    "density": float(g["density"].mean()), metric: mean, "low": lo, "high": hi,
                    "seeds": int(g["seed"].nunique()), "rule": rule})
    return pd.DataFrame(out)


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """The points no smaller point beats in accuracy (sorted by size)."""
    p = points.sort_values(["size_bytes", "accuracy"], ascending=[True, False])
    return p[p["accuracy"] > p["accuracy"].cummax().shift(fill_value=-np.inf)]


def accuracy_vs_size(df: pd.DataFrame) -> plt.Figure:
    """Test accuracy vs compressed size in bytes (log x): every arm x bit width x method as points with
    seed spread (colour: arm; marker: bits; fill: method), and the Pareto front: the large-sparse vs
    small-dense comparison at equal bytes. One run."""
    _one_run(df, "accuracy_vs_size")
    points = compression_points(df)
    front = pareto_front(points)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
        for arm in _arms_in(points["arm"]):
            g = points[points["arm"] == arm]
            for (bits, method), b in g.groupby(["bits", "method"]):
                c = ax.errorbar(b["size_bytes"], 100 * b["accuracy"],
                                yerr=[100 * (b["accuracy"] - b["low"]), 100 * (b["high"] - b["accuracy"])],
                                fmt=BITS_MARKER.get(int(bits), "o"), color=arm_color(arm), markersize=4.5,
                                capsize=1.5, alpha=0.85, linewidth=0.8, fillstyle=method_style(method)["fillstyle"])
                c.lines[0].arm, c.lines[0].method, c.lines[0].bits = arm, method, int(bits)
        ax.step(front["size_bytes"], 100 * front["accuracy"], where="post", color=GREY, linewidth=1,
                label="Pareto front")
        handles = [plt.Line2D([], [], color=arm_color(a), marker="o", linestyle="", label=arm_style(a)["label"])
                   for a in _arms_in(points["arm"])]
        handles += [plt.Line2D([], [], color=GREY, marker=BITS_MARKER.get(int(b), "o"), linestyle="",
                               label="float32" if b == 32 else f"{int(b)}-bit") for b in sorted(set(points["bits"]),
                                                                                               reverse=True)]
        handles += [plt.Line2D([], [], color=GREY, marker="o", linestyle="", fillstyle=method_style(m)["fillstyle"],
                               label=method_style(m)["label"]) for m in sorted(set(points["method"]))]
        handles.append(plt.Line2D([], [], color=GREY, label="Pareto front"))
        ax.set_xscale("log")
        ax.set_xlabel("compressed size (bytes)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{_title(df)}: accuracy at equal compressed size")
        rules = sorted(set(points["rule"]))
        ax.legend(handles=handles, fontsize=7, ncol=2, title="error bars: " + "; ".join(rules), title_fontsize=7)
    fig.pareto_front = front
    fig.points = points
    return fig


def _float_ft_points(df: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """The float_ft rows of a load_runs table as :func:`compression_points` rows (mean and seed spread)."""
    ft = df[df["method"] == "float_ft"] if "method" in df else df.iloc[:0]
    if ft.empty:
        return pd.DataFrame()
    ft = ft.assign(arm=np.where(ft["level"] == 0, "dense", ft["arm"]))
    return _spread_points(ft, metric)


def bits_per_byte_vs_bits(df: pd.DataFrame, max_densities: int = 3) -> plt.Figure:
    """A language model's :func:`accuracy_vs_bits`: test bits per byte (lower is better) vs weight bits."""
    return accuracy_vs_bits(df, max_densities, metric="bits_per_byte")


def accuracy_vs_bits(df: pd.DataFrame, max_densities: int = 3, metric: str = "accuracy") -> plt.Figure:
    """Test accuracy vs weight bits at a few densities (one panel each; dense at 100%): one line per arm
    (colour) and quantization setting (marker and line style: the method), from the float network at 32
    bits; a QAT line starts from its float_ft control (float fine-tuned with QAT's schedule) where the
    store has it. One run. ``metric="bits_per_byte"``: a language model's test bits per byte instead."""
    _one_run(df, "accuracy_vs_bits")
    scale, ylabel = ((1, "test bits per byte (lower is better)") if metric == "bits_per_byte"
                     else (100, "test accuracy (%)"))
    points = compression_points(df.assign(size_bytes=df["size_bytes"].fillna(0)), metric)  # sizes: not drawn
    if not (points["method"] == "float_ft").any():  # QAT's float controls are references, not compressed models
        points = pd.concat([points, _float_ft_points(df, metric)], ignore_index=True)
    levels = sorted(points["level"].unique())
    quantized_levels = sorted(points.loc[points["bits"] < 32, "level"].unique())
    pick = quantized_levels or levels
    if len(pick) > max_densities:
        pick = [pick[i] for i in np.linspace(0, len(pick) - 1, max_densities).round().astype(int)]
    setting = [k for k in POINT_KEYS if k not in ("run_id", "arm", "level", "bits")]
    quantized = points[(points["bits"] < 32) & ~points["method"].isin(["float", "float_ft"])]
    many = {k for k in setting if k != "method" and _as_key(quantized[k]).nunique() > 1}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(pick), figsize=(3.2 * len(pick), 3.2), constrained_layout=True,
                                 sharey=True, squeeze=False)
        for ax, level in zip(axes[0], pick):
            g = points[points["level"] == level]
            q = quantized[quantized["level"] == level]
            for key, a in q.groupby(setting + ["arm"], dropna=False, sort=True):
                key = dict(zip(setting + ["arm"], key))
                arm, method = key["arm"], key["method"]
                start = g[(g["arm"] == arm) & (g["method"] == "float")]
                ft = g[(g["arm"] == arm) & (g["method"] == "float_ft")]
                if method == "qat" and not ft.empty:
                    start = ft
                a = pd.concat([start, a]).sort_values("bits")
                ms = method_style(method)
                label = f"{arm_style(arm)['label']}, {ms['label']}" + "".join(f", {k} {key[k]}" for k in sorted(many))
                c = ax.errorbar(np.log2(a["bits"]), scale * a[metric],
                                yerr=[scale * (a[metric] - a["low"]), scale * (a["high"] - a[metric])],
                                color=arm_color(arm), marker=ms["marker"], fillstyle=ms["fillstyle"], markersize=4.5,
                                capsize=1.5, linestyle=ms["linestyle"], label=label)
                c.lines[0].arm, c.lines[0].method = arm, method
                c.lines[0].start = str(start["method"].iloc[0]) if len(start) else ""
            ticks = sorted(set(g["bits"]))
            ax.set_xticks(np.log2(ticks), [str(int(b)) for b in ticks])
            ax.set_xlabel("weight bits (32: float)")
            ax.set_title(f"{100 * g['density'].mean():.3g}% weights (level {level})")
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=6, title="; ".join(sorted(set(points["rule"]))), title_fontsize=6)
        fig.suptitle(f"{_title(df)}: {ylabel} vs weight bits", fontsize=10)
    return fig


def smallest_within(df: pd.DataFrame, tolerance: float = 0.01) -> pd.DataFrame:
    """Per arm: the smallest model within ``tolerance`` of the dense float network's test accuracy, at
    equal training (QAT judged against its float_ft control); see :func:`analysis.fair.smallest_within`."""
    from .fair import smallest_within as fair_smallest_within

    return fair_smallest_within(df, tolerance)


FORMAT_STYLE = {
    "dense": dict(color=OKABE_ITO["black"], marker="o", label="dense + mask"),
    "bcoo": dict(color=OKABE_ITO["blue"], marker="s", label="BCOO (jax.experimental.sparse)"),
    "csr": dict(color=OKABE_ITO["bluish_green"], marker="^", label="CSR (scipy.sparse)"),
    "compact": dict(color=OKABE_ITO["orange"], marker="D", label="compact (structured)"),
    "int8": dict(color=OKABE_ITO["reddish_purple"], marker="v", label="int8 program"),
    "nm": dict(color=OKABE_ITO["vermillion"], marker="P", label="N:M"),
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
    ax.plot(x, mean, color=style.get("color"), marker=style.get("marker"), linestyle=style.get("linestyle", "-"),
            ms=3, label=label)
    ax.fill_between(x, lo, hi, color=style.get("color"), alpha=0.15, lw=0)
    return stats[0][3] if stats else ""


def error_along_path(stability: pd.DataFrame, max_levels: int = 4) -> plt.Figure:
    """Test error along the linear path between the two copies (Frankle et al. 2020, Fig. 1), one panel
    per level (a few levels), one line per arm: mean and seed spread (summary.seed_spread)."""
    _one_run(stability, "error_along_path")
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
            for arm in _arms_in(g["arm"]):
                ga = g[g["arm"] == arm]
                by = ga.groupby("alpha")["test_error"]
                style = arm_style(arm) if lv > 0 else arm_style("dense")
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
    _one_run(stability, "instability_vs_density")
    from .runs import instability_table
    t = instability_table(_stage_rows(stability))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        dense = t[t["level"] == 0]
        rule = ""
        for arm in _arms_in(t["arm"]):
            g = pd.concat([dense, t[(t["arm"] == arm) & (t["level"] > 0)]]) if arm != "ticket" else t[t["arm"] == arm]
            if g.empty or (arm != "ticket" and not (g["level"] > 0).any()):
                continue
            by = g.groupby("density", sort=True)["instability"]
            x = by.mean().index.to_numpy()[::-1]
            vals = [100 * v.to_numpy() for _, v in by][::-1]
            rule = _band(ax, x, vals, arm_style(arm), arm_style(arm)["label"]) or rule
        _density_axis(ax, t["density"])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel("instability (error barrier, pp)")
        ax.set_title(f"{_title(stability)}: instability vs sparsity")
        ax.legend(title=f"mean and {rule}", title_fontsize=8)
    return fig


def instability_vs_rewind(stability: pd.DataFrame) -> plt.Figure:
    """Instability vs rewind step k (``lth stability``), one line per (level, arm)."""
    _one_run(stability, "instability_vs_rewind")
    from .runs import instability_table
    t = instability_table(stability[stability["source"] == "rewind"])
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        rule = ""
        for i, ((lv, arm), g) in enumerate(t.groupby(["level", "arm"], sort=True)):
            by = g.groupby("rewind_step", sort=True)["instability"]
            style = arm_style(arm) if lv > 0 else arm_style("dense")
            label = f"{style.get('label', arm)}, {100 * g['density'].mean():.3g}% weights"
            if t["level"].nunique() > 1:  # the arm's colour; the level: marker and line style
                style["marker"] = MARKERS[i % len(MARKERS)]
                style["linestyle"] = LINESTYLES[i % len(LINESTYLES)]
            rule = _band(ax, by.mean().index.to_numpy(), [100 * v.to_numpy() for _, v in by], style, label) or rule
        ax.set_xscale("symlog", linthresh=max(1, float(t["rewind_step"][t["rewind_step"] > 0].min())
                                            if (t["rewind_step"] > 0).any() else 1))
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("rewind step k (iterations)")
        ax.set_ylabel("instability (error barrier, pp)")
        ax.set_title(f"{_title(stability)}: instability vs rewind step")
        ax.legend(title=f"mean and {rule}", title_fontsize=8)
    return fig
