"""Figures as a reader sees them (issue 21): runs apart, methods apart, too few evaluations said, one palette.

Each test builds a small synthetic store (no training) and checks the matplotlib objects: lines, labels,
titles, texts and colours.
"""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot  # noqa: E402,F401
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import figures, load_runs, load_sparsity, summarize  # noqa: E402
from analysis.report import write_report  # noqa: E402
from analysis.runs import quant_rows  # noqa: E402
from lth.cli import main  # noqa: E402
from lth.config import ExperimentConfig  # noqa: E402
from lth.store import RunStore, parquet_bytes  # noqa: E402

SEEDS = [0, 1, 2]


def acc(arm, level, seed, step, shift=0.0):
    base = 0.9 - shift - (0.0 if arm == "ticket" else 0.04 * level)
    return base - 0.01 * seed - (0.1 if step < 20 else 0.0)


def make_run(root, hparams, levels=3, arms=("ticket", "reinit"), steps=(10, 20), shift=0.0, quant=None):
    """A completed run folder with synthetic metrics and sparsity tables; returns its run id."""
    run_id = ExperimentConfig.from_dict(hparams).run_id
    store = RunStore(root, run_id)
    store.path.mkdir(parents=True)
    (store.path / "hparams.json").write_text(json.dumps({**hparams, "run_id": run_id}))
    for level in range(levels):
        density = 0.8 ** level
        rows, sp = [], []
        for a_i, arm in enumerate(["ticket"] if level == 0 else arms):
            for s in SEEDS:
                for step in steps:
                    for split in ("train", "val", "test"):
                        a = acc(arm, level, s, step, shift)
                        rows.append(dict(run_id=run_id, level=level, arm=arm, seed=s, member=a_i * 3 + s,
                                         density=density, step=step, split=split, loss=1 - a, accuracy=a,
                                         early_stop_step=steps[-1], wall_s=1.0))
                for layer in ("dense_0/kernel", "dense_1/kernel", "output/kernel"):  # two pruned alike
                    d = 0.9 ** level if layer == "output/kernel" else density
                    sp.append(dict(level=level, arm=arm, seed=s, member=a_i * 3 + s, layer=layer, kind="dense",
                                   shape="4x4", count=16, nonzero=int(16 * d), kept=int(16 * d), density=d,
                                   prunable=True))
        files = {"metrics.parquet": parquet_bytes(pd.DataFrame(rows)),
                 "sparsity.parquet": parquet_bytes(pd.DataFrame(sp))}
        store.write_level(level, files)
        if quant is not None and level > 0:
            (store.path / f"level_{level:03d}" / "quant.parquet").write_bytes(
                parquet_bytes(pd.DataFrame(quant(run_id, level, density))))
    return run_id


def quant_table(run_id, level, density, float_ft=False):
    """PTQ below QAT at every bit width; float_ft (QAT's float control) optionally."""
    rows = []
    for s in SEEDS:
        for b in (2, 4, 8):
            for method, gain in (("ptq", 0.0), ("qat", 0.2)):
                rows.append(dict(run_id=run_id, level=level, arm="ticket", seed=s, density=density, bits=b,
                                 scheme="sym", granularity="channel", calibration="minmax", method=method,
                                 act_bits=0, accuracy=0.4 + 0.05 * b + gain - 0.01 * s, float_accuracy=0.88,
                                 size_bytes=100 * b, float_size_bytes=3200.0, fp32_dense_bytes=3200,
                                 compression=32 / b))
        if float_ft:
            rows.append(dict(run_id=run_id, level=level, arm="ticket", seed=s, density=density, bits=32,
                             scheme="float", granularity="", calibration="", method="float_ft", act_bits=0,
                             accuracy=0.93 - 0.01 * s, float_accuracy=0.88, size_bytes=3200,
                             float_size_bytes=3200.0, fp32_dense_bytes=3200, compression=1.0))
    return rows


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    matplotlib.pyplot.close("all")


BASE = {"name": "synthetic", "train": {"lr": 0.1}, "seeds": SEEDS, "arms": ["ticket", "reinit"]}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One store, two runs of one experiment that differ in prune.rate (a 2-point sweep)."""
    root = tmp_path_factory.mktemp("sweep")
    ids = {rate: make_run(root, {**BASE, "prune": {"rate": rate}}, shift=0.1 * (rate == 0.5))
           for rate in (0.2, 0.5)}
    return root, ids


# ---------------------------------------------------------------------------- item 5: never pool runs

def test_two_prune_rates_give_two_curves_per_arm_and_a_summary_column(sweep, tmp_path):
    from analysis.runs import run_table, swept_keys
    root, ids = sweep
    assert swept_keys(run_table(root)) == ["prune.rate"]
    df = load_runs(root)
    fig = figures.accuracy_vs_density(df)
    curves = [ln for ln in fig.axes[0].get_lines() if getattr(ln, "arm", None) in ("ticket", "reinit")]
    assert sorted((ln.arm, ln.run_id) for ln in curves) == sorted((a, r) for a in ("ticket", "reinit")
                                                                  for r in ids.values())
    for ln in curves:  # each curve is its own run's means, never the mean over runs
        s = summarize(df[df["run_id"] == ln.run_id])
        g = s[s["arm"] == ln.arm].sort_values("density", ascending=False)
        np.testing.assert_allclose(ln.get_ydata()[-len(g):], 100 * g["final_accuracy_mean"])
    labels = {ln.get_label() for ln in curves}
    assert "winning ticket (prune.rate=0.2)" in labels and "winning ticket (prune.rate=0.5)" in labels
    made = write_report(root, tmp_path / "figs")
    summary = pd.read_csv(tmp_path / "figs" / "summary.csv")
    assert "prune.rate" in summary.columns
    assert dict(zip(summary["run_id"].astype(str), summary["prune.rate"])) == {ids[0.2]: 0.2, ids[0.5]: 0.5}
    assert "prune.rate" in (tmp_path / "figs" / "README.md").read_text()
    # a figure that draws one run is drawn once per run
    assert {f"layer_density_profile_{r}" for r in ids.values()} <= set(made)


def _no_drawing(monkeypatch):
    """Figures are not saved (the test reads tables and READMEs): saves seconds on 2 cores."""
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, path, **kw: open(path, "wb").close())


def test_by_facets_and_runs_selects(sweep, tmp_path, capsys, monkeypatch):
    root, ids = sweep
    fig = figures.accuracy_vs_density(load_runs(root), by="prune.rate")
    panels = [ax for ax in fig.axes if ax.get_lines()]
    assert [ax.get_title() for ax in panels] == ["prune.rate = 0.2", "prune.rate = 0.5"]
    assert all({getattr(ln, "run_id", None) for ln in ax.get_lines()} - {None} == {ids[r]}
               for ax, r in zip(panels, (0.2, 0.5)))
    out = tmp_path / "one"
    _no_drawing(monkeypatch)
    assert main(["report", str(root), "--out", str(out), "--runs", ids[0.5], "--by", "prune.rate"]) == 0
    assert set(pd.read_csv(out / "summary.csv")["run_id"].astype(str)) == {ids[0.5]}
    assert main(["report", str(root), "--out", str(out), "--runs", "nosuchrun"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuchrun" in err[0] and ids[0.2] in err[0]
    assert main(["report", str(root), "--out", str(out), "--by", "prune.rat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prune.rat" in err[0] and "prune.rate" in err[0]


def test_two_experiments_in_one_folder_get_a_subfolder_each(tmp_path, monkeypatch):
    _no_drawing(monkeypatch)
    root = tmp_path / "runs"
    a = make_run(root, {**BASE, "name": "exp_a"}, levels=2)
    b = make_run(root, {**BASE, "name": "exp_b", "model": {"widths": [8]}}, levels=2, shift=0.2)
    made = write_report(root, tmp_path / "figs")
    assert "exp_a/accuracy_vs_density" in made and "exp_b/accuracy_vs_density" in made
    for name, run_id in (("exp_a", a), ("exp_b", b)):
        assert set(pd.read_csv(tmp_path / "figs" / name / "summary.csv")["run_id"].astype(str)) == {run_id}
    readme = (tmp_path / "figs" / "README.md").read_text()
    assert "exp_a/" in readme and "exp_b/" in readme and a in readme and b in readme


# ---------------------------------------------------------------------------- item 3: methods apart

def test_ptq_and_qat_are_never_averaged_and_drawn_apart(tmp_path):
    root = tmp_path / "runs"
    make_run(root, BASE, levels=3, quant=quant_table)
    full = load_runs(root)
    q = quant_rows(full)
    fig = figures.quant_heatmap(q)
    tables = fig.heatmap_tables
    assert set(tables) == {"PTQ", "QAT"}
    for method, table in (("ptq", tables["PTQ"]), ("qat", tables["QAT"])):
        rows = q[(q["method"] == method) & (q["bits"] == 4) & (q["level"] == 1)]
        assert table.loc[4, 0.8] == pytest.approx(rows["accuracy"].mean())
    mixed = q[(q["bits"] == 4) & (q["level"] == 1)]["accuracy"].mean()  # the model that does not exist
    for ax, table in zip(fig.axes[:2], tables.values()):
        row = list(table.index).index(4)
        assert not np.isclose(ax.images[0].get_array()[row], 100 * mixed).any()
    fig = figures.accuracy_vs_bits(full)
    lines = [ln for ln in fig.axes[0].get_lines() if getattr(ln, "method", None) in ("ptq", "qat")]
    markers = {ln.method: (ln.get_marker(), ln.get_fillstyle(), ln.get_linestyle()) for ln in lines}
    assert markers["ptq"] != markers["qat"] and markers["ptq"][0] != markers["qat"][0]
    fig = figures.accuracy_vs_size(full)
    fills = {(ln.method, ln.bits): ln.get_fillstyle() for ln in fig.axes[0].get_lines() if hasattr(ln, "method")}
    assert fills[("ptq", 4)] != fills[("qat", 4)]


def test_float_ft_is_the_float_reference_of_qat(tmp_path):
    root = tmp_path / "runs"
    make_run(root, BASE, levels=2, quant=lambda r, lv, d: quant_table(r, lv, d, float_ft=True))
    full = load_runs(root)
    fig = figures.quant_heatmap(full)
    assert set(fig.heatmap_tables) == {"PTQ", "QAT"}  # float_ft is no panel of its own
    assert fig.heatmap_tables["QAT"].loc[32, 0.8] == pytest.approx(np.mean([0.93 - 0.01 * s for s in SEEDS]))
    assert fig.heatmap_tables["PTQ"].loc[32, 0.8] == pytest.approx(0.88)
    qat_ax = fig.axes[1]
    assert "fine-tuned" in qat_ax.get_yticklabels()[0].get_text()
    fig = figures.accuracy_vs_bits(full)
    starts = {ln.method: ln.start for ln in fig.axes[0].get_lines() if hasattr(ln, "start")}
    assert starts == {"ptq": "float", "qat": "float_ft"}
    qat = [ln for ln in fig.axes[0].get_lines() if getattr(ln, "method", None) == "qat"][0]
    assert qat.get_ydata()[-1] == pytest.approx(100 * np.mean([0.93 - 0.01 * s for s in SEEDS]))  # at 32 bits
    unsized = full.assign(size_bytes=np.nan)  # the bits figure draws no sizes: it needs none
    fig = figures.accuracy_vs_bits(unsized)
    assert {ln.method: ln.start for ln in fig.axes[0].get_lines() if hasattr(ln, "start")} == starts


# ---------------------------------------------------------------------------- item 8: too few evaluations

def test_one_evaluation_per_level_is_said_not_drawn_empty(tmp_path):
    root = tmp_path / "runs"
    make_run(root, BASE, levels=2, steps=(20,))  # eval_every >= the steps of a level: one evaluation
    df = load_runs(root)
    fig = figures.learning_curves(df)
    for ax in fig.axes:
        assert not ax.get_lines()
        assert any("train.eval_every" in t.get_text() for t in ax.texts)
    fig = figures.early_stop_vs_density(df)
    assert not fig.axes[0].get_lines()
    assert any("eval_every" in t.get_text() and "step 20" in t.get_text() for t in fig.axes[0].texts)


def test_an_early_stop_at_every_last_step_is_said(sweep):
    root, ids = sweep  # two evaluations a level, every early-stop step the last one
    fig = figures.early_stop_vs_density(load_runs(root, run_ids=[ids[0.2]]))
    assert fig.axes[0].get_lines()
    assert any("still improving" in t.get_text() for t in fig.axes[0].texts)


# ---------------------------------------------------------------------------- item 9: what a reviewer asked for

def test_accuracy_figure_has_a_dense_line_and_says_weights_remaining(sweep):
    root, ids = sweep
    df = load_runs(root, run_ids=[ids[0.2]])
    fig = figures.accuracy_vs_density(df)
    dense = [ln for ln in fig.axes[0].get_lines() if getattr(ln, "arm", None) == "dense"]
    level0 = summarize(df).query("level == 0")["final_accuracy_mean"].iloc[0]
    assert len(dense) == 1 and np.allclose(dense[0].get_ydata(), 100 * level0)
    titles = [fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in fig.axes]
    assert any("accuracy vs weights remaining" in t for t in titles)


def test_learning_curves_pair_the_ticket_with_its_reinit_dashed_with_seed_bands(sweep):
    root, ids = sweep
    df = load_runs(root, run_ids=[ids[0.2]])
    fig = figures.learning_curves(df)
    ax = fig.axes[-1]  # the last level shown
    by_label = {ln.get_label(): ln for ln in ax.get_lines()}
    ticket, reinit = by_label["winning ticket"], by_label["random reinit"]
    assert ticket.get_linestyle() == "-" and reinit.get_linestyle() == "--"
    assert ticket.get_color() == figures.arm_color("ticket") and reinit.get_color() == figures.arm_color("reinit")
    assert len(ax.collections) >= 2  # a seed band per line


def test_heatmap_text_is_readable_on_every_cell(tmp_path):
    root = tmp_path / "runs"
    make_run(root, BASE, levels=2, quant=quant_table)
    fig = figures.quant_heatmap(quant_rows(load_runs(root)))
    colors = set()
    for ax in fig.axes[:2]:
        im = ax.images[0]
        for t in ax.texts:
            bg = np.array(im.cmap(im.norm(float(t.get_text()))))[:3]
            fg = np.array(mcolors.to_rgb(t.get_color()))
            lum = [0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2] for c in (bg, fg)]
            assert abs(lum[0] - lum[1]) > 0.3, (t.get_text(), t.get_color())
            colors.add(t.get_color())
    assert colors == {"black", "white"}


def test_no_line_of_the_layer_profile_hides_another(sweep):
    root, ids = sweep
    sp = load_sparsity(root)
    fig = figures.layer_density_profile(sp[sp["run_id"] == ids[0.2]])
    lines = fig.axes[0].get_lines()
    for i, a in enumerate(lines):
        for b in lines[i + 1:]:
            same = (np.allclose(a.get_xdata(), b.get_xdata()) and np.allclose(a.get_ydata(), b.get_ydata())
                    and a.get_marker() == b.get_marker() and a.get_linestyle() == b.get_linestyle())
            assert not same, (a.get_label(), b.get_label())
    ys = {ln.get_label(): ln.get_ydata() for ln in lines}
    np.testing.assert_allclose(ys["dense_0/kernel"], ys["dense_1/kernel"])  # pruned alike, still both seen


def test_one_okabe_ito_palette_and_one_colour_per_arm(sweep, tmp_path):
    root, ids = sweep
    allowed = {mcolors.to_hex(c) for c in [*figures.OKABE_ITO.values(), figures.GREY]}
    df = load_runs(root, run_ids=[ids[0.2]])
    sp = load_sparsity(root)
    figs = [figures.accuracy_vs_density(df), figures.early_stop_vs_density(df), figures.learning_curves(df),
            figures.layer_density_profile(sp[sp["run_id"] == ids[0.2]])]
    seen = {}
    for fig in figs:
        for ax in fig.axes:
            for ln in ax.get_lines():
                assert mcolors.to_hex(ln.get_color()) in allowed, (ax.get_title(), ln.get_label(), ln.get_color())
                if getattr(ln, "arm", None):
                    seen.setdefault(ln.arm, set()).add(mcolors.to_hex(ln.get_color()))
    assert all(len(c) == 1 for c in seen.values()) and seen["ticket"] == {mcolors.to_hex(figures.arm_color("ticket"))}
    assert mcolors.to_hex(figures.arm_color("rigl")) in allowed  # any arm: a fixed palette colour
    assert figures.arm_color("rigl") == figures.arm_color("rigl")


def test_the_level_overlap_heatmap_is_gone():
    """IMP masks are nested: the level x level overlap of one seed's masks draws the pruning schedule."""
    from analysis import mask_figures
    assert not hasattr(mask_figures, "level_overlap_heatmap")
