"""`lth report`: a results folder -> figures (PDF + PNG), tables (CSV, LaTeX, Markdown), README.md."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from . import figures
from .runs import float_rows, instability_table, load_runs, load_sparsity, load_stability, quant_rows
from .summary import paired_differences, spread_rule, summarize
from .tables import paired_tables, percent_columns, summary_tables, write_table_files


def _write_tables(summary: pd.DataFrame, out: Path, stem: str, diffs: pd.DataFrame | None = None) -> list[Path]:
    """``<stem>.csv``: the tidy summary (one row per run, arm, level; accuracies as fractions);
    ``<stem>.md`` / ``.tex``: the paper tables (:func:`analysis.tables.summary_tables`, percent);
    with ``diffs`` (:func:`analysis.summary.paired_differences`) also ``paired_differences.csv/.md/.tex``."""
    summary.to_csv(out / f"{stem}.csv", index=False)
    notes = ""
    if summary["diverged"].any():
        bad = summary[summary["diverged"] > 0]
        notes = "diverged (training loss non-finite or far above its first value): " + "; ".join(
            f"run {r.run_id} level {r.level} {r.arm}: {r.diverged} of {r.seeds} seeds" for r in bad.itertuples())
    paths = [out / f"{stem}.csv"] + write_table_files(summary_tables(summary), out, stem, dense_span=True,
                                                      stack=True, notes=notes)
    if diffs is not None and not diffs.empty:
        diffs.to_csv(out / "paired_differences.csv", index=False)
        paths += [out / "paired_differences.csv"] + write_table_files(paired_tables(diffs, summary), out,
                                                                      "paired_differences", stack=True)
    return paths


def _write_smallest(small: pd.DataFrame, out: Path) -> None:
    """smallest_within_1pp.csv (fractions) and .md / .tex (accuracy and density in percent, escaped)."""
    small.to_csv(out / "smallest_within_1pp.csv", index=False)
    t = percent_columns(small, ["dense_float_accuracy", "density", "accuracy"])
    write_table_files([("", t)], out, "smallest_within_1pp")


def _write_speed(t: pd.DataFrame, out: Path) -> None:
    """speed.md / .tex from :func:`analysis.speed.speed_table` (escaped)."""
    write_table_files([("", t)], out, "speed")


def _mask_plans(root, out: Path) -> list:
    """Write the mask-analysis tables; the figures they support as (stem, make, caption) plans."""
    from . import mask_figures as mf
    from .masks import ALL, mask_analysis

    tables = mask_analysis(root)
    plans = []
    ticket, seeds, levels, eb = tables["ticket"], tables["seeds"], tables["levels"], tables["earlybird"]
    if not ticket.empty and (ticket["level"] > 0).any():
        ticket.to_csv(out / "mask_ticket.csv", index=False)
        seeds.to_csv(out / "mask_seeds.csv", index=False)
        levels.to_csv(out / "mask_levels.csv", index=False)
        t = ticket[ticket["layer"] == ALL].groupby(["run_id", "level"]).mean(numeric_only=True).reset_index()
        if not seeds.empty:
            sd = seeds[seeds["layer"] == ALL].groupby(["run_id", "level"])["jaccard"].mean().rename("jaccard_seeds")
            t = t.join(sd, on=["run_id", "level"])
        t = t.drop(columns=["seed", "kept"], errors="ignore")
        (out / "mask_summary.md").write_text(t.to_markdown(index=False, floatfmt=".4f") + "\n")
        for run_id in sorted(ticket["run_id"].unique()):
            tag = f"_{run_id}" if ticket["run_id"].nunique() > 1 else ""
            tk, sd_run = ticket[ticket["run_id"] == run_id], seeds[seeds["run_id"] == run_id] if not seeds.empty else seeds
            lv = levels[levels["run_id"] == run_id]
            plans.append((f"mask_overlap_vs_density{tag}", lambda tk=tk, sd_run=sd_run: mf.overlap_vs_density(tk, sd_run),
                          f"Run {run_id}: Jaccard overlap of the ticket masks (all prunable weights) with one-shot "
                          "magnitude pruning of the init and of the trained dense network at the ticket's per-layer "
                          "counts, and between seeds, vs weights remaining; dotted: chance."))
            if not sd_run.empty and (sd_run["level"] > 0).any():
                plans.append((f"mask_overlap_seeds{tag}", lambda sd_run=sd_run, tk=tk: mf.seed_overlap_heatmaps(sd_run, tk),
                              f"Run {run_id}: seed x seed Jaccard of the ticket masks at several levels."))
            if lv["level_b"].nunique() > 1:
                plans.append((f"mask_overlap_levels{tag}", lambda lv=lv: mf.level_overlap_heatmap(lv),
                              f"Run {run_id}: level x level Jaccard of each seed's ticket masks (mean over seeds)."))
    if not eb.empty:
        eb.to_csv(out / "earlybird.csv", index=False)
        plans.append(("earlybird_distance", lambda: mf.earlybird_distance(eb),
                      "Early-bird detection (You et al. 2020): normalized Hamming distance between the level-1 "
                      "magnitude masks of successive epochs of the dense run (mean over seeds; thin: per layer)."))
    return plans


def write_report(root: str | Path, out: str | Path) -> dict[str, str]:
    """Write every figure the data supports and the summary tables; returns {file stem: caption}."""
    full = load_runs(root)
    df = float_rows(full)
    if df.empty:
        raise ValueError(f"{root}: the store has no completed level yet; nothing to report")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(df)
    _write_tables(summary, out, "summary", paired_differences(df))
    n_seeds = int(summary["seeds"].max())
    made: dict[str, str] = {}
    plans = [
        ("accuracy_vs_density", lambda: figures.accuracy_vs_density(df),
         f"Final test accuracy vs weights remaining per arm (mean, {spread_rule(n_seeds)})."),
        ("early_stop_accuracy_vs_density", lambda: figures.accuracy_vs_density(df, metric="early_stop_test"),
         f"Test accuracy at the early-stop step (peak validation accuracy) vs weights remaining (mean, "
         f"{spread_rule(n_seeds)})."),
        ("early_stop_vs_density", lambda: figures.early_stop_vs_density(df),
         f"Early-stopping step (peak validation accuracy) vs weights remaining ({n_seeds} seeds)."),
        ("learning_curves_ticket", lambda: figures.learning_curves(df, "ticket"),
         "Test accuracy vs training step of the winning ticket at several sparsity levels (mean over seeds)."),
    ]
    if "small_dense" in set(df["arm"]):
        plans.append(("sparse_vs_dense", lambda: figures.sparse_vs_dense(df),
                      f"Large-sparse tickets vs small-dense models at matched non-zero parameter count "
                      f"(mean, std over {n_seeds} seeds)."))
    quant = quant_rows(full)
    if not quant.empty:
        plans.append(("accuracy_vs_size", lambda: figures.accuracy_vs_size(full),
                      "Test accuracy vs compressed size in bytes (log) of every arm x bit width (float32 = the "
                      "network stored sparse), with the Pareto front: which is most accurate at equal bytes. "
                      "Error bars: min-max over seeds below 3 seeds, else 95% CI."))
        plans.append(("accuracy_vs_bits", lambda: figures.accuracy_vs_bits(full),
                      "Test accuracy vs weight bits per arm at a few densities (PTQ dashed, QAT solid)."))
        if (quant["arm"] == "ticket").any():
            plans.append(("quant_heatmap", lambda: figures.quant_heatmap(quant),
                          "Test accuracy of quantized tickets per weight bits and weights remaining (mean over "
                          "seeds and settings)."))
        quant.to_csv(out / "quant.csv", index=False)
        small = figures.smallest_within(full)
        if not small.empty:
            _write_smallest(small, out)
    if set(figures.PAI_ARMS) & set(df["arm"]):
        plans.append(("pai_accuracy_vs_density", lambda: figures.pai_accuracy_vs_density(df),
                      f"Pruning at initialization (SNIP, GraSP, SynFlow at the ticket's per-layer counts, from the "
                      f"ticket's start weights; dashed: their masks shuffled within each layer) beside the ticket "
                      f"and random pruning: final test accuracy vs weights remaining (mean, {spread_rule(n_seeds)})."))
    plans += _mask_plans(root, out)
    sparsity = load_sparsity(root)
    if not sparsity.empty and sparsity["level"].nunique() > 1:
        plans.append(("layer_density_profile", lambda: figures.layer_density_profile(sparsity),
                      "Weights remaining per prunable layer across IMP levels (winning ticket, mean over seeds)."))
    stability = load_stability(root)
    if not stability.empty:
        stage = stability[stability["source"] == "stage"]
        if not stage.empty:
            plans.append(("error_along_path", lambda: figures.error_along_path(stability),
                          "Test error along the linear path between two copies trained with different SGD noise "
                          "(Frankle et al. 2020), per level and arm (mean and seed spread)."))
            if stage["level"].nunique() > 1:
                plans.append(("instability_vs_density", lambda: figures.instability_vs_density(stability),
                              "Instability (max test error on the path minus the mean of the endpoint errors, "
                              "percentage points) vs weights remaining per arm (mean and seed spread)."))
        if (stability["source"] == "rewind").any():
            plans.append(("instability_vs_rewind", lambda: figures.instability_vs_rewind(stability),
                          "Instability vs rewind step k (`lth stability`): the level's masks with the dense "
                          "run's weights at step k, two copies each (mean and seed spread)."))
        instability_table(stability).to_csv(out / "instability.csv", index=False)
    from .speed import crossover, load_speed, speed_table
    speed = load_speed(root)
    if not speed.empty:
        cross = crossover(speed)
        for run_id, sp in speed.groupby("run_id", sort=True):  # one figure per run (model)
            stem = "latency_vs_density" + (f"_{run_id}" if speed["run_id"].nunique() > 1 else "")
            plans.append((stem, lambda sp=sp, run_id=run_id: figures.latency_vs_density(
                              sp, cross[cross["run_id"] == run_id]),
                          f"Inference latency (best of the timed repeats) of run {run_id} ({sp['model'].iloc[0]}) "
                          "vs weights remaining per format and batch size; dotted lines: the density from which a "
                          "format beats dense."))
        speed.to_csv(out / "speed.csv", index=False)
        _write_speed(speed_table(speed), out)
        c = cross.assign(crossover_density=100 * cross["crossover_density"],
                         first_faster_density=100 * cross["first_faster_density"],
                         best_at_density=100 * cross["best_at_density"])
        c.to_csv(out / "crossover.csv", index=False)
        (out / "crossover.md").write_text(c.to_markdown(index=False, floatfmt=".3g") + "\n\nNaN: never faster "
                                          "than dense at the measured densities.\n")
    for stem, make, caption in plans:
        fig = make()
        for ext in ("pdf", "png"):
            fig.savefig(out / f"{stem}.{ext}", dpi=200)
        plt.close(fig)
        made[stem] = caption
    lines = ["# lth report", "", f"Source: `{Path(root).resolve()}`; {df['run_id'].nunique()} run(s), "
             f"{n_seeds} seed(s).", "", "## Figures", ""]
    lines += [f"- `{stem}.pdf` / `{stem}.png`: {cap}" for stem, cap in made.items()]
    if summary["diverged"].any():
        lines += ["", "Black crosses mark (run, arm, level) points where at least one seed diverged (training "
                  "loss non-finite or above 100x its first-step value; `diverged` column of the tables)."]
    lines += ["", "## Tables", "", "- `summary.csv`: one row per (run, arm, level), accuracies as fractions: density, "
              "seeds (n), diverged and still-improving seeds, swept keys, and n/mean/std/min/max/95% CI (from 3 "
              "seeds) of the final test accuracy, the test accuracy at the early-stop step "
              "(`early_stop_test_accuracy`: the step of peak validation accuracy) and the early-stop step. "
              "`summary.md` / `summary.tex`: the same as paper tables per run (rows: weights remaining, dense "
              "first; columns: arms; percent)."]
    if (out / "paired_differences.csv").is_file():
        lines += ["- `paired_differences.csv` / `.md` / `.tex`: ticket minus each other arm, matched by run, level "
                  "and seed (mean, min-max, 95% paired t-interval from 3 seeds, n; percentage points in .md/.tex)."]
    if (out / "smallest_within_1pp.csv").is_file() and not quant.empty:
        lines += ["- `quant.csv`: every quantized row (one per cell and seed).",
                  "- `smallest_within_1pp.csv` / `.md` / `.tex`: per arm, the smallest model (bytes, density, bits, "
                  "method) whose mean test accuracy is within 1 point of the dense float network's."]
    if not stability.empty:
        lines += ["- `instability.csv`: one row per (run, source, level, rewind step, arm, seed): density, "
                  "instability, loss_barrier, endpoint errors error_0/error_1, max_error."]
    if (out / "mask_ticket.csv").is_file():
        lines += ["- `mask_ticket.csv`: per (run, seed, level, layer; `all` = every prunable weight) the ticket's "
                  "density, Jaccard with the previous level's mask, with one-shot magnitude pruning of the init and "
                  "of the trained dense network at the same per-layer counts, chance `d / (2 - d)`, and the "
                  "fraction of surviving weights whose sign changed from init; `mask_seeds.csv`: Jaccard between "
                  "seeds per level; `mask_levels.csv`: between levels per seed; `mask_summary.md`: means over seeds."]
    if (out / "earlybird.csv").is_file():
        lines += ["- `earlybird.csv`: per (run, seed, epoch, layer) of the dense run, the normalized Hamming distance "
                  "between the level-1 magnitude masks of successive epochs (early-bird detection)."]
    if not speed.empty:
        lines += ["- `speed.csv` / `speed.md` / `speed.tex`: (format, weights remaining, bytes, latency, speedup over "
                  "dense) per level and batch size; `crossover.csv` / `crossover.md`: per format and batch size the "
                  "density (%) from which it beats dense (NaN: never faster)."]
    lines.append("")
    (out / "README.md").write_text("\n".join(lines))
    return made
