"""Figures of the mask analysis (:mod:`analysis.masks`). Each function returns a matplotlib Figure."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .figures import GREY, STYLE, arm_color, density_axis, plt  # noqa: F401 - plt: the Agg-configured pyplot
from .masks import ALL


def _levels_to_show(levels, most: int) -> list[int]:
    levels = sorted(levels)
    if len(levels) > most:
        levels = [levels[i] for i in np.linspace(0, len(levels) - 1, most).round().astype(int)]
    return levels


def _heat(ax, table: pd.DataFrame, title: str):
    im = ax.imshow(table.to_numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns])
    ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index])
    for (i, j), v in np.ndenumerate(table.to_numpy()):
        if np.isfinite(v) and table.size <= 64:
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if v < 0.6 else "black")
    ax.set_title(title, fontsize=9)
    return im


def seed_overlap_heatmaps(seeds: pd.DataFrame, ticket: pd.DataFrame, most: int = 6) -> plt.Figure:
    """Seed x seed Jaccard of the ticket masks (all prunable weights) at up to ``most`` levels >= 1
    of one run; the diagonal is 1."""
    s = seeds[(seeds["layer"] == ALL) & (seeds["level"] > 0)]
    levels = _levels_to_show(s["level"].unique(), most)
    dens = ticket[ticket["layer"] == ALL].groupby("level")["density"].mean()
    ids = sorted(set(s["seed_a"]) | set(s["seed_b"]))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(levels), figsize=(2.3 * len(levels) + 0.8, 2.6), constrained_layout=True,
                                 squeeze=False)
        im = None
        for ax, level in zip(axes[0], levels):
            m = pd.DataFrame(np.eye(len(ids)), index=ids, columns=ids)
            for r in s[s["level"] == level].itertuples():
                m.loc[r.seed_a, r.seed_b] = m.loc[r.seed_b, r.seed_a] = r.jaccard
            im = _heat(ax, m, f"level {level} ({100 * dens.get(level, np.nan):.3g}% weights)")
            ax.set_xlabel("seed")
            ax.set_ylabel("seed")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="Jaccard")
        fig.suptitle("ticket masks: overlap between seeds", fontsize=10)
    return fig


def overlap_vs_density(ticket: pd.DataFrame, seeds: pd.DataFrame) -> plt.Figure:
    """Jaccard of the ticket (all prunable weights) with one-shot magnitude pruning of the init and of
    the trained dense network, and between seeds, vs weights remaining; chance ``d / (2 - d)`` dotted."""
    t = ticket[(ticket["layer"] == ALL) & (ticket["level"] > 0)]
    g = t.groupby("level").agg(density=("density", "mean"), init=("jaccard_oneshot_init", "mean"),
                               trained=("jaccard_oneshot_trained", "mean"), chance=("jaccard_random", "mean"))
    sd = (seeds[seeds["layer"] == ALL].groupby("level")["jaccard"].mean() if not seeds.empty  # one seed: none
          else pd.Series(dtype=float))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
        ticket = arm_color("ticket")  # every line is about ticket masks: the ticket's colour, told apart by style
        ax.plot(g["density"], g["trained"], marker="o", color=ticket, label="vs one-shot |w| of trained dense")
        ax.plot(g["density"], g["init"], marker="s", linestyle="--", color=ticket, fillstyle="none",
                label="vs one-shot |w| of init")
        if not sd.empty:
            ax.plot(g["density"], sd.reindex(g.index).to_numpy(), marker="^", linestyle="-.", color=ticket,
                    label="between seeds")
        ax.plot(g["density"], g["chance"], linestyle=":", color=GREY, label="chance, d / (2 - d)")
        density_axis(ax, g["density"])
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("Jaccard overlap of ticket masks")
        ax.set_title("ticket mask overlap (mean over seeds)")
        ax.legend(fontsize=7)
    return fig


def earlybird_distance(eb: pd.DataFrame, threshold: float = 0.1, labels: dict | None = None) -> plt.Figure:
    """Normalized Hamming distance between the level-1 masks of successive epochs of the dense run
    (You et al. 2020), all prunable weights (solid, mean over seeds) and per layer (thin). One panel per
    run (runs are never drawn in one axes), titled by ``labels`` (run_id -> the settings that differ,
    :func:`analysis.runs.run_labels`; default: the run id) when there are several."""
    runs = sorted(eb["run_id"].unique())
    labels = labels or {}
    cols = min(len(runs), 3)
    rows = -(-len(runs) // cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(5, 3.4) if len(runs) == 1 else (3.4 * cols + 0.4, 2.9 * rows),
                                 constrained_layout=True, squeeze=False, sharey=True)
        for ax in axes.flat[len(runs):]:
            ax.set_visible(False)
        for ax, run_id in zip(axes.flat, runs):
            for layer, g in eb[eb["run_id"] == run_id].groupby("layer", sort=True):
                m = g.groupby("epoch")["distance"].mean()
                if layer == ALL:
                    ax.plot(m.index, m.to_numpy(), marker="o", markersize=3, linewidth=2, color=arm_color("dense"),
                            label="all layers")
                else:
                    ax.plot(m.index, m.to_numpy(), linewidth=0.8, alpha=0.7, label=layer)
            ax.axhline(threshold, color=GREY, linestyle=":", label=f"{threshold} (You et al.)")
            ax.set_yscale("log")
            ax.set_xlabel("epoch of the dense run")
            if len(runs) > 1:
                ax.set_title(labels.get(run_id, str(run_id)), fontsize=8)
            ax.legend(fontsize=6 if len(runs) > 1 else 7)
        for ax in axes[:, 0]:
            ax.set_ylabel("mask distance to previous epoch")
        title = "early-bird: level-1 mask distance between epochs"
        if len(runs) == 1:
            axes[0, 0].set_title(title)
        else:
            fig.suptitle(title, fontsize=10)
    return fig
