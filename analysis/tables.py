"""Tables a person reads: paper layout (rows: weights remaining; columns: arms), percent, seed spread
stated, and Markdown / LaTeX writers whose LaTeX escapes every piece of text (:func:`latex_escape`).

DataFrames keep accuracies as fractions; only the text written here is in percent.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from .summary import MIN_SEEDS_FOR_CI

# LaTeX's special characters in text mode, and the few non-ASCII signs the tables use
_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
          ">": r"\textgreater{}", "|": r"\textbar{}", "–": "--", "—": "---", "−": "-", "±": r"\ensuremath{\pm}",
          "†": r"\textdagger{}", "×": r"\ensuremath{\times}"}
_LATEX_RE = re.compile("|".join(re.escape(c) for c in _LATEX))


def latex_escape(text) -> str:
    """``text`` (any value, via ``str``) safe in LaTeX text mode: ``\\ & % $ # _ { } ~ ^ < > |`` and the
    signs ``– — − ± † ×`` become their LaTeX commands, so "acc (%)" no longer comments out the row and
    "random_prune" no longer opens a subscript."""
    return _LATEX_RE.sub(lambda m: _LATEX[m.group()], str(text))


def _cell(v, float_format: str) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else float_format % v
    return str(v)


def _stacked(text: str) -> str:
    """A paper cell ``mean ± h (min–max), note, ...`` with the min-max and each note on a line of its own
    (a nested tabular: no package needed)."""
    head, sep, tail = text.partition(" (")
    if not sep:
        return latex_escape(text)
    parts = [head] + ("(" + tail).split(", ")
    return r"\begin{tabular}[t]{@{}r@{}}" + r"\\".join(latex_escape(p) for p in parts) + r"\end{tabular}"


def latex_table(df: pd.DataFrame, caption: str = "", float_format: str = "%.4g", index: bool = False,
                dense_span: bool = False, stack: bool = False, panel_columns: int | None = None) -> str:
    """A booktabs ``tabular`` (inside a ``table`` float with ``caption`` when one is given) of ``df``:
    every header and cell escaped with :func:`latex_escape`, NaN as an empty cell. ``dense_span``: a first
    row whose only non-empty value cell is its first spans all value columns (the dense network, shared
    by every arm). ``stack``: value cells ``a (b)`` print ``(b)`` under ``a``, so a paper table of a few
    arms fits a page. ``panel_columns``: a table of more value columns is split into panels of at most
    that many, one under the other in the same float, each with the first column again (a paper table of
    4+ arms is wider than an article page otherwise; the dense row spans each panel). Needs
    ``\\usepackage{booktabs}``."""
    if index:
        df = df.reset_index()
    cols = list(df.columns)
    texts = [[_cell(v, float_format) for v in row] for row in df.itertuples(index=False)]
    dense = (texts[0][1] if dense_span and texts and len(cols) > 2 and not any(texts[0][2:]) else None)
    n = panel_columns if panel_columns and len(cols) - 1 > panel_columns else max(len(cols) - 1, 1)
    lines = []
    for start in range(1, max(len(cols), 2), n):
        keep = [0] + list(range(start, min(start + n, len(cols))))
        if lines:
            lines.append(r"\par\medskip")
        lines += _tabular([cols[j] for j in keep], [[t[j] for j in keep] for t in texts], dense, stack)
    if caption:
        lines = [r"\begin{table}[htbp]", r"\centering", r"\small", r"\setlength{\tabcolsep}{3pt}",
                 r"\caption{" + latex_escape(caption) + "}"] + \
            lines + [r"\end{table}"]
    return "\n".join(lines) + "\n"


def _tabular(cols: list, texts: list[list[str]], dense: str | None, stack: bool) -> list[str]:
    """The lines of one booktabs ``tabular`` of the cell ``texts``; ``dense``: the first row's value,
    spanning every value column."""
    lines = [r"\begin{tabular}{" + "l" + "r" * (len(cols) - 1) + "}", r"\toprule",
             " & ".join(_header(str(c)) for c in cols) + r" \\", r"\midrule"]
    for i, row in enumerate(texts):
        cells = [latex_escape(row[0])] + [(_stacked if stack else latex_escape)(t) for t in row[1:]]
        if dense is not None and i == 0:
            cells = [cells[0], r"\multicolumn{%d}{c}{%s}" % (len(cells) - 1, (_stacked if stack else latex_escape)(dense))]
        lines.append(" & ".join(cells) + r" \\")
    return lines + [r"\bottomrule", r"\end{tabular}"]


def _header(name: str) -> str:
    """An escaped column header; a long one of several words on two lines (a nested tabular, no extra
    package), so that a table of many columns fits the page width."""
    words = name.split()
    if len(name) <= 8 or len(words) < 2:
        return latex_escape(name)
    cut = min(range(1, len(words)), key=lambda i: abs(len(" ".join(words[:i])) - len(" ".join(words[i:]))))
    top, bottom = " ".join(words[:cut]), " ".join(words[cut:])
    return r"\begin{tabular}[b]{@{}c@{}}" + latex_escape(top) + r" \\ " + latex_escape(bottom) + r"\end{tabular}"


def markdown_table(df: pd.DataFrame, caption: str = "", float_format: str = ".4g", index: bool = False) -> str:
    """``df`` as a Markdown (pipe) table, ``caption`` as a paragraph above it."""
    text = df.to_markdown(index=index, floatfmt=float_format) + "\n"
    return (caption + "\n\n" + text) if caption else text


def write_table_files(tables: list[tuple[str, pd.DataFrame]], out, stem: str, float_format: str = "%.4g",
                      dense_span: bool = False, stack: bool = False, notes: str = "",
                      panel_columns: int | None = None) -> list:
    """Write ``(caption, table)`` pairs to ``<out>/<stem>.md`` and ``<out>/<stem>.tex`` (one ``table``
    float each, escaped; ``panel_columns``: see :func:`latex_table`); returns the two paths. ``notes``: a
    closing paragraph of the Markdown file."""
    from pathlib import Path

    out = Path(out)
    md = "\n".join(markdown_table(t, f"**{c}**" if c else "", float_format.lstrip("%")) for c, t in tables)
    (out / f"{stem}.md").write_text(md + (f"\n{notes}\n" if notes else ""))
    tex = "\n".join(latex_table(t, c, float_format, dense_span=dense_span, stack=stack, panel_columns=panel_columns)
                    for c, t in tables)
    (out / f"{stem}.tex").write_text(tex)
    return [out / f"{stem}.md", out / f"{stem}.tex"]


# ---- paper layout ---------------------------------------------------------------------------------------


def spread_text(mean: float, lo_min: float, hi_max: float, ci_low: float, n: int, scale: float = 100.0,
                sign: bool = False) -> str:
    """``mean ± h (min–max)`` in percent (``scale``): ``± h`` the half-width of the 95% t-interval, given
    from 3 seeds on (DESIGN.md rule 4); the min-max always. ``sign``: a leading + on positive means."""
    if not np.isfinite(mean):
        return ""
    f = "{:+.2f}" if sign else "{:.2f}"
    text = f.format(scale * mean)
    if n >= MIN_SEEDS_FOR_CI and np.isfinite(ci_low):
        text += " ± {:.2f}".format(scale * (mean - ci_low))
    if n > 1:
        text += " ({:.2f}–{:.2f})".format(scale * lo_min, scale * hi_max)
    return text


def _density_label(level: int, density: float) -> str:
    return f"{100 * density:.3g} (dense)" if level == 0 else f"{100 * density:.3g}"


ROW_HEADER = "weights remaining (%)"


def _layout(cells: pd.DataFrame, arms: list[str], density: pd.Series) -> pd.DataFrame:
    """cells indexed by (level, arm) -> rows by level (dense first), one column per arm."""
    t = cells.unstack("arm").reindex(columns=arms).fillna("")
    t = t.sort_index()
    t.insert(0, ROW_HEADER, [_density_label(lv, density[lv]) for lv in t.index])
    return t.reset_index(drop=True)


def _arms_in_order(arms) -> list[str]:
    order = ["ticket", "reinit", "random_prune", "shuffle", "small_dense"]
    arms = list(dict.fromkeys(arms))
    return [a for a in order if a in arms] + sorted(a for a in arms if a not in order)


def _n_note(n: pd.Series) -> str:
    vals = sorted(set(int(v) for v in n))
    return f"n = {vals[0]} seed{'s' if vals[0] != 1 else ''}" if len(vals) == 1 else \
        f"n = {vals[0]}-{vals[-1]} seeds (per cell: n=)"


def _run_title(run_id: str, g: pd.DataFrame, keys: list[str]) -> str:
    exp = g["experiment"].iloc[0] if "experiment" in g else ""
    swept = ", ".join(f"{k} = {g[k].iloc[0]}" for k in keys if k in g)
    return f"run {run_id}" + (f" ({exp}{'; ' + swept if swept else ''})" if exp or swept else "")


def summary_tables(summary: pd.DataFrame, split: str = "test",
                   select: str = "accuracy") -> list[tuple[str, pd.DataFrame]]:
    """Paper tables of a :func:`analysis.summary.summarize` table, per run (runs are never pooled): rows =
    weights remaining (%) with the dense network (level 0) its own first row, columns = arms. Three per
    run: ``split`` accuracy at the early-stop step, at the end of training (both %), and the early-stop
    step. Cells: mean ± 95% t half-width (from 3 seeds) (min–max), n in the caption (per cell where it
    varies); † and "still improving k/n" where the validation peak is the last evaluated step; "diverged
    k/n" where seeds diverged. Returns ``(caption, table)`` pairs."""
    keys = [c for c in summary.columns if "." in c]  # the swept keys summarize carries
    how = "peak validation accuracy" if select == "accuracy" else "minimum validation loss"
    es = f"early_stop_{split}_accuracy"
    out = []
    for run_id, g in summary.groupby("run_id", sort=True):
        arms = _arms_in_order(g["arm"])  # the dense network is level 0's "ticket": the first column
        density = g.groupby("level")["density"].first()
        if "ticket" in set(g["arm"]):
            density.update(g[g["arm"] == "ticket"].set_index("level")["density"])
        varies = g["seeds"].nunique() > 1
        title = _run_title(run_id, g, keys)
        note = _n_note(g["seeds"])

        def cells(col: str, scale: float, fmt_int: bool = False, improving: str = "") -> pd.Series:
            vals = {}
            for r in g.itertuples(index=False):
                r = r._asdict()
                n = int(r["seeds"])
                if fmt_int:
                    m = r[f"{col}_mean"]
                    text = "" if not np.isfinite(m) else f"{m:.0f}" + (
                        f" ({r[f'{col}_min']:.0f}–{r[f'{col}_max']:.0f})" if n > 1 else "")
                else:
                    text = spread_text(r[f"{col}_mean"], r[f"{col}_min"], r[f"{col}_max"], r[f"{col}_ci_low"], n,
                                       scale)
                if text and improving and r["still_improving"]:
                    text += "†" if improving == "mark" else f", still improving {r['still_improving']}/{n}"
                if text and r["diverged"]:
                    text += f", diverged {r['diverged']}/{n}"
                if text and varies:
                    text += f", n={n}"
                vals[(r["level"], r["arm"])] = text
            s = pd.Series(vals, dtype=object)
            s.index.names = ["level", "arm"]
            return s

        spread = "mean ± 95% t-interval half-width (from 3 seeds) (min–max over seeds)"
        dagger = "; †: for some seeds the validation peak is the last evaluated step (still improving)" \
            if g["still_improving"].any() else ""
        if "final_bits_per_byte_mean" in g and np.isfinite(g["final_bits_per_byte_mean"]).any():
            # a language model: bits per byte (lower is better), not its per-token accuracy
            out.append((f"{title}: {split} bits per byte (lower is better) at the early-stop step ({how}); {spread}; "
                        f"{note}{dagger}.",
                        _layout(cells(f"early_stop_{split}_bits_per_byte", 1, improving="mark"), arms, density)))
            out.append((f"{title}: {split} bits per byte (lower is better) at the end of training; {spread}; {note}.",
                        _layout(cells("final_bits_per_byte", 1), arms, density)))
        else:
            out.append((f"{title}: {split} accuracy (%) at the early-stop step ({how}); {spread}; {note}{dagger}.",
                        _layout(cells(es, 100, improving="mark"), arms, density)))
            out.append((f"{title}: {split} accuracy (%) at the end of training; {spread}; {note}.",
                        _layout(cells("final_accuracy", 100), arms, density)))
        out.append((f"{title}: early-stop step (first step of {how}; iterations); mean (min–max); "
                    f"{note}; still improving: the peak is the last evaluated step, not an early stop.",
                    _layout(cells("early_stop_step", 1, fmt_int=True, improving="text"), arms, density)))
    return out


def paired_tables(diffs: pd.DataFrame, summary: pd.DataFrame | None = None) -> list[tuple[str, pd.DataFrame]]:
    """Paper tables of :func:`analysis.summary.paired_differences`, per run and metric: rows = weights
    remaining (%), columns = "reference - arm", cells = mean paired difference in percentage points ±
    95% t half-width (from 3 seeds) (min–max), n in the caption (per cell where it varies)."""
    out = []
    if diffs.empty:
        return out
    what = {"early_stop_test_accuracy": "test accuracy at the early-stop step (peak validation accuracy)",
            "final_accuracy": "test accuracy at the end of training",
            "early_stop_test_bits_per_byte": "test bits per byte (lower is better) at the early-stop step "
                                             "(minimum validation loss)",
            "final_bits_per_byte": "test bits per byte (lower is better) at the end of training"}
    keys = [c for c in summary.columns if "." in c] if summary is not None else []
    for (run_id, metric), g in diffs.groupby(["run_id", "metric"], sort=True):
        ref = g["reference"].iloc[0]
        arms = _arms_in_order(g["arm"])
        varies = g["n"].nunique() > 1
        vals = {}
        for r in g.itertuples(index=False):
            text = spread_text(r.diff_mean, r.diff_min, r.diff_max, r.diff_ci_low, int(r.n), sign=True,
                               scale=1 if metric.endswith("bits_per_byte") else 100)
            vals[(r.level, r.arm)] = text + (f", n={int(r.n)}" if text and varies else "")
        s = pd.Series(vals, dtype=object)
        s.index.names = ["level", "arm"]
        density = g.groupby("level")["density"].first()
        t = _layout(s, arms, density).rename(columns={a: f"{ref} - {a}" for a in arms})
        bpb = metric.endswith("bits_per_byte")
        info = summary[summary["run_id"] == run_id] if summary is not None else g
        title = _run_title(run_id, info if not info.empty else g, keys)
        out.append((f"{title}: paired difference {ref} minus control of the {what.get(metric, metric)}, "
                    f"{'bits per byte (negative: the reference is better)' if bpb else 'percentage points'}, "
                    f"matched by seed; mean ± 95% t-interval half-width (from 3 pairs) "
                    f"(min–max over seeds); {_n_note(g['n']).replace('seed', 'pair')}.", t))
    return out


def percent_columns(df: pd.DataFrame, columns, digits: int = 2) -> pd.DataFrame:
    """A copy of ``df`` with the fraction ``columns`` in percent, renamed ``"<name> (%)"``."""
    t = df.copy()
    for c in columns:
        if c in t:
            t[c] = (100 * t[c]).round(digits)
    return t.rename(columns={c: f"{c} (%)" for c in columns if c in t})
