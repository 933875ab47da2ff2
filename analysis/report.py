"""`lth report`: a results folder -> figures (PDF + PNG), tables (CSV, LaTeX, Markdown), README.md."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from . import figures
from .runs import (experiments, float_ft_rows, float_rows, instability_table, load_runs, load_sparsity,
                   load_stability, quant_rows, run_labels, run_table, swept_keys, with_settings)
from .summary import paired_differences, spread_rule, summarize
from .tables import paired_tables, percent_columns, summary_tables, write_table_files

# arms per panel of a LaTeX paper table: with their stacked spreads, 3 arms fit an article page (4 are 45pt
# too wide), so a run of more arms gets its table in panels, one under the other
PANEL_ARMS = 3


def _write_tables(summary: pd.DataFrame, out: Path, stem: str, diffs: pd.DataFrame | None = None,
                  select: str = "accuracy") -> list[Path]:
    """``<stem>.csv``: the tidy summary (one row per run, arm, level; accuracies as fractions);
    ``<stem>.md`` / ``.tex``: the paper tables (:func:`analysis.tables.summary_tables`, percent);
    with ``diffs`` (:func:`analysis.summary.paired_differences`) also ``paired_differences.csv/.md/.tex``;
    ``select``: how ``summary``'s early-stop step was chosen (named in the captions)."""
    summary.to_csv(out / f"{stem}.csv", index=False)
    notes = ""
    if summary["diverged"].any():
        bad = summary[summary["diverged"] > 0]
        notes = "diverged (training loss non-finite or far above its first value): " + "; ".join(
            f"run {r.run_id} level {r.level} {r.arm}: {r.diverged} of {r.seeds} seeds" for r in bad.itertuples())
    paths = [out / f"{stem}.csv"] + write_table_files(summary_tables(summary, select=select), out, stem,
                                                      dense_span=True, stack=True, notes=notes,
                                                      panel_columns=PANEL_ARMS)
    if diffs is not None and not diffs.empty:
        diffs.to_csv(out / "paired_differences.csv", index=False)
        paths += [out / "paired_differences.csv"] + write_table_files(paired_tables(diffs, summary), out,
                                                                      "paired_differences", stack=True,
                                                                      panel_columns=PANEL_ARMS)
    return paths


def _write_smallest(small: pd.DataFrame, out: Path) -> None:
    """smallest_within_1pp.csv (every column, fractions) and .md / .tex: one paper table per run, its
    dense float accuracy in the caption, short headers, accuracy and density in percent (escaped)."""
    small.to_csv(out / "smallest_within_1pp.csv", index=False)
    short = {"arm": "arm", "method": "method", "bits": "bits", "density": "weights (%)", "size_bytes": "bytes",
             "compression_vs_dense": "x smaller", "accuracy": "acc. (%)", "reference": "vs",
             "judged_accuracy": "judged acc. (%)", "seeds": "n"}
    tables = []
    for run_id, part in small.groupby("run_id", sort=False):
        t = percent_columns(part, ["density", "accuracy", "judged_accuracy"])
        t = t.rename(columns={f"{c} (%)": c for c in ("density", "accuracy", "judged_accuracy")})
        t = t[[c for c in short if c in t]].rename(columns=short)
        t = t.replace({"method": {"none within tolerance": "none"}}).astype(object).where(t.notna(), "")
        dense = 100 * float(part["dense_float_accuracy"].iloc[0])
        tables.append((f"run {run_id}: per arm, the smallest model within 1 point of the dense float network's "
                       f"test accuracy ({dense:.2f}%) at equal training (vs: the reference; QAT is judged against "
                       f"float_ft, its float control: judged acc. = float acc. + QAT - float_ft; none: no model "
                       f"within 1 point)", t))
    write_table_files(tables, out, "smallest_within_1pp")


def _write_speed(t: pd.DataFrame, out: Path) -> None:
    """speed.md / .tex from :func:`analysis.speed.speed_table` (escaped)."""
    write_table_files([("", t)], out, "speed")


def _mask_plans(root, out: Path, run_ids=None, labels: dict | None = None) -> list:
    """Write the mask-analysis tables; the figures they support as (stem, make, caption) plans. ``labels``:
    run_id -> the settings that tell the runs apart (:func:`analysis.runs.run_labels`)."""
    from . import mask_figures as mf
    from .masks import ALL, mask_analysis

    from .runs import run_dirs
    if run_ids is None:
        tables = mask_analysis(root)
    else:  # the chosen runs only: the analysis reads every mask of a run it is given
        parts = [mask_analysis(d) for d in run_dirs(Path(root)) if d.name in set(run_ids)]
        tables = {k: pd.concat([t[k] for t in parts if not t[k].empty] or [pd.DataFrame()], ignore_index=True)
                  for k in ("ticket", "seeds", "levels", "earlybird", "arms")}
    plans = []
    ticket, seeds, levels, eb = tables["ticket"], tables["seeds"], tables["levels"], tables["earlybird"]
    if not ticket.empty and (ticket["level"] > 0).any():
        ticket.to_csv(out / "mask_ticket.csv", index=False)
        seeds.to_csv(out / "mask_seeds.csv", index=False)
        levels.to_csv(out / "mask_levels.csv", index=False)
        if not tables["arms"].empty:
            tables["arms"].to_csv(out / "mask_arms.csv", index=False)
        t = ticket[ticket["layer"] == ALL].groupby(["run_id", "level"]).mean(numeric_only=True).reset_index()
        if not seeds.empty:
            sd = seeds[seeds["layer"] == ALL].groupby(["run_id", "level"])["jaccard"].mean().rename("jaccard_seeds")
            t = t.join(sd, on=["run_id", "level"])
        t = t.drop(columns=["seed", "kept"], errors="ignore")
        (out / "mask_summary.md").write_text(t.to_markdown(index=False, floatfmt=".4f") + "\n")
        for run_id in sorted(ticket["run_id"].unique()):
            tag = f"_{run_id}" if ticket["run_id"].nunique() > 1 else ""
            tk, sd_run = ticket[ticket["run_id"] == run_id], seeds[seeds["run_id"] == run_id] if not seeds.empty else seeds
            plans.append((f"mask_overlap_vs_density{tag}", lambda tk=tk, sd_run=sd_run: mf.overlap_vs_density(tk, sd_run),
                          f"Run {run_id}: Jaccard overlap of the ticket masks (all prunable weights) with one-shot "
                          "magnitude pruning of the init and of the trained dense network at the ticket's per-layer "
                          "counts, and between seeds, vs weights remaining; dotted: chance."))
            if not sd_run.empty and (sd_run["level"] > 0).any():
                plans.append((f"mask_overlap_seeds{tag}", lambda sd_run=sd_run, tk=tk: mf.seed_overlap_heatmaps(sd_run, tk),
                              f"Run {run_id}: seed x seed Jaccard of the ticket masks at several levels."))
    if not eb.empty:
        eb.to_csv(out / "earlybird.csv", index=False)
        several = " One panel per run, titled by the settings that differ." if eb["run_id"].nunique() > 1 else ""
        plans.append(("earlybird_distance", lambda: mf.earlybird_distance(eb, labels=labels),
                      "Early-bird detection (You et al. 2020): normalized Hamming distance between the level-1 "
                      f"magnitude masks of successive epochs of the dense run (mean over seeds; thin: per layer).{several}"))
    return plans


def write_report(root: str | Path, out: str | Path, runs: list[str] | None = None, by: str | None = None
                 ) -> dict[str, str]:
    """Write every figure the data supports and the summary tables; returns {file stem: caption}.

    Members of different runs are never averaged together: figures draw one line per (run, arm) or one
    figure per run, and the tables have a column per setting that differs between the runs (e.g.
    ``prune.rate``). ``runs``: the run ids to report (default: all under ``root``); ``by``: a setting to
    facet the accuracy figures by (one panel per value). A folder holding several experiments (different
    names, data or models) gets one subfolder each and a README.md listing them."""
    table = run_table(root)
    if table.empty:
        from .runs import NotAStoreError
        raise NotAStoreError(f"{root} is not an lth store: no <run_id>/hparams.json inside")
    if runs is not None:
        unknown = sorted(set(runs) - set(table["run_id"]))
        if unknown:
            raise ValueError(f"--runs: no run {', '.join(unknown)} in {root}; its runs: "
                             f"{', '.join(table['run_id'])}")
        table = table[table["run_id"].isin(set(runs))].reset_index(drop=True)
    if by is not None and by not in table.columns:
        raise ValueError(f"--by {by}: not a setting of these runs; settings that differ between them: "
                         f"{', '.join(swept_keys(table)) or 'none (one run)'} (any dotted setting, e.g. prune.rate)")
    groups = experiments(table)
    if len(groups) == 1:
        return _write_experiment(root, out, table, next(iter(groups.values())), by)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    lines = ["# lth report", "", f"Source: `{Path(root).resolve()}`: {len(groups)} experiments (runs with a "
             "different name, data or model), one folder each; members of different runs are never averaged "
             "together.", "", "| folder | runs | settings that differ between its runs |", "| --- | --- | --- |"]
    for name, ids in groups.items():
        folder = _slug(name)
        sub = table[table["run_id"].isin(ids)]
        try:
            m = _write_experiment(root, out / folder, table, ids, by)
        except ValueError as e:  # an experiment with no completed level yet
            lines.append(f"| {folder} (not drawn: {e}) | {', '.join(ids)} | |")
            continue
        made.update({f"{folder}/{k}": v for k, v in m.items()})
        lines.append(f"| [`{folder}/`]({folder}/README.md) | {', '.join(ids)} | "
                     f"{', '.join(swept_keys(sub)) or '(one run)'} |")
    lines.append("")
    (out / "README.md").write_text("\n".join(lines))
    return made


def _with_keys(summary: pd.DataFrame, table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``summary`` with a column per swept setting (merged on run_id), placed after run_id."""
    if not keys:
        return summary
    missing = [k for k in keys if k not in summary.columns]  # summarize may carry them already
    out = summary.merge(table[["run_id"] + missing], on="run_id", how="left") if missing else summary
    first = list(summary.columns[:1]) + keys
    return out[first + [c for c in out.columns if c not in first]]


def _slug(name: str) -> str:
    import re
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "experiment"


def _lm_plans(df: pd.DataFrame, by: str | None, n_seeds: int, runs_note: str, facet_note: str) -> list:
    """The density and learning-curve figures of a language model: bits per byte, lower is better (the
    early-stop step: minimum validation loss)."""
    control = "reinit" if "reinit" in set(df["arm"]) else "random_prune"
    return [
        ("bits_per_byte_vs_density", lambda: figures.bits_per_byte_vs_density(df, by=by),
         f"Final test bits per byte (lower is better) vs weights remaining per arm (mean, {spread_rule(n_seeds)}); "
         f"dotted: the dense network.{runs_note}{facet_note}"),
        ("early_stop_bits_per_byte_vs_density",
         lambda: figures.bits_per_byte_vs_density(df, metric="early_stop_test", by=by),
         f"Test bits per byte (lower is better) at the early-stop step (minimum validation loss) vs weights "
         f"remaining (mean, {spread_rule(n_seeds)}).{runs_note}{facet_note}"),
        ("learning_curves_ticket", lambda: figures.learning_curves(df, "ticket", control=control,
                                                                    metric="bits_per_byte"),
         f"Test bits per byte (lower is better) vs training step of the winning ticket (solid) and "
         f"{figures.arm_style(control)['label']} (dashed) at several levels (mean and seed band; one row per run)."),
    ]


def _write_experiment(root: str | Path, out: str | Path, table: pd.DataFrame, run_ids: list[str],
                      by: str | None = None) -> dict[str, str]:
    """The report of one experiment: the runs ``run_ids`` of ``table`` (a :func:`run_table`)."""
    table = table[table["run_id"].isin(set(run_ids))]
    keys = swept_keys(table)
    full = load_runs(root, run_ids=run_ids)
    full = with_settings(full, table, keys + ([by] if by and by not in keys else []))
    df = float_rows(full)
    if df.empty:
        raise ValueError(f"{root}: the store has no completed level yet; nothing to report")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(table, keys)
    lm = figures.is_language_model(df)  # a language model is judged by bits per byte (lower is better)
    summary = summarize(df, select="loss") if lm else summarize(df)
    summary = _with_keys(summary, table, keys)
    _write_tables(summary, out, "summary",
                  paired_differences(df, select="loss", metrics=("early_stop_test_bits_per_byte",
                                                                 "final_bits_per_byte"))
                  if lm else paired_differences(df), select="loss" if lm else "accuracy")
    n_seeds = int(summary["seeds"].max())
    made: dict[str, str] = {}
    runs_note = (f" One line per run (line style), labelled by the settings that differ: {', '.join(keys)}."
                 if len(run_ids) > 1 and keys else "")
    facet_note = f" One panel per {by}." if by else ""
    plans = [
        ("accuracy_vs_density", lambda: figures.accuracy_vs_density(df, by=by),
         f"Final test accuracy vs weights remaining per arm (mean, {spread_rule(n_seeds)}); dotted: the dense "
         f"network.{runs_note}{facet_note}"),
        ("early_stop_accuracy_vs_density", lambda: figures.accuracy_vs_density(df, metric="early_stop_test", by=by),
         f"Test accuracy at the early-stop step (peak validation accuracy) vs weights remaining (mean, "
         f"{spread_rule(n_seeds)}).{runs_note}{facet_note}"),
        ("early_stop_vs_density", lambda: figures.early_stop_vs_density(df, by=by),
         f"Early-stopping step (peak validation accuracy) vs weights remaining ({n_seeds} seeds).{runs_note}"
         f"{facet_note}"),
        ("learning_curves_ticket", lambda: figures.learning_curves(df, "ticket"),
         "Test accuracy vs training step of the winning ticket (solid) and its random reinit (dashed) at "
         "several levels (mean and seed band; one row per run)."),
    ]
    if lm:
        plans = _lm_plans(df, by, n_seeds, runs_note, facet_note)

    def per_run(stem: str, frame: pd.DataFrame, make, caption: str) -> None:
        """One figure per run of ``frame`` (suffix ``_<run_id>`` when there are several): it draws one."""
        ids = [r for r in run_ids if r in set(frame["run_id"])]
        for run_id in ids:
            part = frame[frame["run_id"] == run_id]
            if len(ids) > 1 or len(run_ids) > 1:
                plans.append((f"{stem}_{run_id}", lambda part=part: make(part),
                              f"Run {run_id} ({labels.get(run_id, run_id)}): {caption}"))
            else:
                plans.append((stem, lambda part=part: make(part), caption))

    if "small_dense" in set(df["arm"]):
        per_run("sparse_vs_dense", df[df["run_id"].isin(df.loc[df["arm"] == "small_dense", "run_id"])],
                figures.sparse_vs_dense,
                f"Large-sparse tickets vs small-dense models at matched non-zero parameter count "
                f"(mean, std over {n_seeds} seeds).")
    quant = quant_rows(full)
    if not quant.empty and lm:
        per_run("bits_per_byte_vs_bits", full[full["run_id"].isin(set(quant["run_id"]))], figures.bits_per_byte_vs_bits,
                "Test bits per byte (lower is better) vs weight bits per arm (colour) and quantization setting "
                "(PTQ hollow squares, dashed; QAT filled circles, solid, from its float_ft control where computed) "
                "at a few densities.")
        pd.concat([quant, float_ft_rows(full)], ignore_index=True).to_csv(out / "quant.csv", index=False)
    elif not quant.empty:
        with_quant = full[full["run_id"].isin(set(quant["run_id"]))]
        per_run("accuracy_vs_size", with_quant, figures.accuracy_vs_size,
                "Test accuracy vs compressed size in bytes (log) of every arm x bit width x method (colour: arm; "
                "marker: bits; hollow: PTQ; float32 = the network stored sparse), with the Pareto front: which is "
                "most accurate at equal bytes. Error bars: min-max over seeds below 3 seeds, else 95% CI.")
        per_run("accuracy_vs_bits", with_quant, figures.accuracy_vs_bits,
                "Test accuracy vs weight bits per arm (colour) and quantization setting (marker and line: "
                "PTQ hollow squares, dashed; QAT filled circles, solid, from its float_ft control where "
                "computed) at a few densities.")
        if (quant["arm"] == "ticket").any():
            per_run("quant_heatmap", with_quant, figures.quant_heatmap,
                    "Test accuracy of quantized tickets per weight bits and weights remaining, one panel per "
                    "quantization setting (mean over seeds only); top row: the float network (for QAT: float "
                    "fine-tuned with QAT's schedule, where computed).")
        pd.concat([quant, float_ft_rows(full)], ignore_index=True).to_csv(out / "quant.csv", index=False)
        small = figures.smallest_within(full)
        if not small.empty:
            _write_smallest(small, out)
    if set(figures.PAI_ARMS) & set(df["arm"]):
        plans.append(("pai_accuracy_vs_density", lambda: figures.pai_accuracy_vs_density(df),
                      f"Pruning at initialization (SNIP, GraSP, SynFlow at the ticket's per-layer counts, from the "
                      f"ticket's start weights; dashed: their masks shuffled within each layer) beside the ticket "
                      f"and random pruning: final test accuracy vs weights remaining (mean, {spread_rule(n_seeds)})."))
    plans += _mask_plans(root, out, run_ids, labels)
    sparsity = load_sparsity(root)
    sparsity = sparsity[sparsity["run_id"].isin(set(run_ids))] if not sparsity.empty else sparsity
    if not sparsity.empty and sparsity["level"].nunique() > 1:
        per_run("layer_density_profile", sparsity, figures.layer_density_profile,
                "Weights remaining per prunable layer across IMP levels (winning ticket, mean over seeds; each "
                "layer its own marker and line style, spread a little about each level so none hides another).")
    stability = load_stability(root)
    stability = stability[stability["run_id"].isin(set(run_ids))] if not stability.empty else stability
    if not stability.empty:
        stage = stability[stability["source"] == "stage"]
        if not stage.empty:
            per_run("error_along_path", stability, figures.error_along_path,
                    "Test error along the linear path between two copies trained with different SGD noise "
                    "(Frankle et al. 2020), per level and arm (mean and seed spread).")
            if stage["level"].nunique() > 1:
                per_run("instability_vs_density", stability, figures.instability_vs_density,
                        "Instability (max test error on the path minus the mean of the endpoint errors, "
                        "percentage points) vs weights remaining per arm (mean and seed spread).")
        if (stability["source"] == "rewind").any():
            per_run("instability_vs_rewind", stability[stability["source"] == "rewind"], figures.instability_vs_rewind,
                    "Instability vs rewind step k (`lth stability`): the level's masks with the dense "
                    "run's weights at step k, two copies each (mean and seed spread).")
        instability_table(stability).to_csv(out / "instability.csv", index=False)
    from .speed import crossover, load_speed, speed_table
    speed = load_speed(root)
    speed = speed[speed["run_id"].isin(set(run_ids))] if not speed.empty else speed
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
             f"{n_seeds} seed(s).", ""]
    if len(run_ids) > 1:
        lines += ["Members of different runs are never averaged together. Runs and the settings that tell them "
                  "apart (also columns of `summary.csv`):", "", "| run | " + " | ".join(keys or ["run"]) + " |",
                  "|---" * (1 + max(1, len(keys))) + "|"]
        values = table.set_index("run_id")
        lines += [f"| {r} | " + " | ".join([str(values.loc[r, k]) for k in keys] if keys else [r]) + " |"
                  for r in run_ids if r in set(df["run_id"])]
        lines.append("")
    lines += ["## Figures", ""]
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
    if lm:
        lines += ["- A language model: `summary.csv` also holds `final_bits_per_byte` and "
                  "`early_stop_test_bits_per_byte` (test bits per byte, lower is better; early stop at the minimum "
                  "validation loss), and `summary.md` / `.tex` and the paired differences are in bits per byte."]
    if (out / "paired_differences.csv").is_file():
        lines += ["- `paired_differences.csv` / `.md` / `.tex`: ticket minus each other arm, matched by run, level "
                  "and seed (mean, min-max, 95% paired t-interval from 3 seeds, n; percentage points in .md/.tex)."]
    if (out / "smallest_within_1pp.csv").is_file() and not quant.empty:
        lines += ["- `quant.csv`: every quantized row (one per cell and seed), and QAT's float control (`method = "
                  "float_ft`: the same member fine-tuned in float with QAT's schedule).",
                  "- `smallest_within_1pp.csv` / `.md` / `.tex`: per arm, the smallest model (bytes, density, bits, "
                  "method) within 1 point of the dense float network's test accuracy at equal training: float and "
                  "PTQ models by their accuracy (`reference = float`), QAT models by their change against float_ft "
                  "of the same member added to the float network's accuracy (`reference = float_ft`, "
                  "`judged_accuracy`), so QAT's extra fine-tuning does not count as a gain."]
    if not stability.empty:
        lines += ["- `instability.csv`: one row per (run, source, level, rewind step, arm, seed): density, "
                  "instability, loss_barrier, endpoint errors error_0/error_1, max_error."]
    if (out / "mask_ticket.csv").is_file():
        lines += ["- `mask_ticket.csv`: per (run, seed, level, layer; `all` = every prunable weight) the ticket's "
                  "density, Jaccard with the previous level's mask, with one-shot magnitude pruning of the init and "
                  "of the trained dense network at the same per-layer counts, chance `d / (2 - d)`, and the "
                  "fraction of surviving weights whose sign changed from init; `mask_seeds.csv`: Jaccard between "
                  "seeds per level; `mask_levels.csv`: between levels per seed; `mask_summary.md`: means over seeds."]
        if (out / "mask_arms.csv").is_file():
            lines += ["- `mask_arms.csv`: per (run, seed, level, arm, layer) the other arms' masks (set/rigl: the final "
                      "one) against the same seed's ticket: density, Jaccard, and chance `pq / (p + q - pq)`."]
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
