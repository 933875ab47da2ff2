"""Analysis from a small synthetic store: summaries, plotted data, report files."""

import json

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import figures, load_runs, load_sparsity, summarize  # noqa: E402
from analysis.report import _write_tables, write_report  # noqa: E402
from lth.config import ExperimentConfig  # noqa: E402
from lth.store import RunStore, parquet_bytes  # noqa: E402

ARMS = ["ticket", "random_prune"]
SEEDS = [0, 1, 2]
LEVELS = 4
HPARAMS = {"name": "synthetic", "train": {"lr": 0.1}, "seeds": SEEDS}
RUN = ExperimentConfig.from_dict(HPARAMS).run_id  # hparams.json must hash to its folder's name


def acc(arm, level, seed, step):
    base = 0.9 - (0.0 if arm == "ticket" else 0.05 * level)
    return base - 0.01 * seed - (0.1 if step == 10 else 0.0)


def val_acc(arm, level, seed, step):
    """Validation peaks at step 10 for odd seeds (test still rises to step 20), at step 20 for even ones."""
    return acc(arm, level, seed, step) + (0.2 if seed % 2 and step == 10 else 0.0)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    store = RunStore(root, RUN)
    store.path.mkdir()
    (store.path / "hparams.json").write_text(json.dumps(
        {**HPARAMS, "run_id": RUN}))
    for level in range(LEVELS):
        density = 0.8 ** level
        arms = ["ticket"] if level == 0 else ARMS
        rows, sp = [], []
        for a_i, arm in enumerate(arms):
            for s in SEEDS:
                member = a_i * len(SEEDS) + s
                for step in (10, 20):
                    for split in ("train", "val", "test"):
                        a = (val_acc if split == "val" else acc)(arm, level, s, step)
                        rows.append(dict(run_id=RUN, level=level, arm=arm, seed=s, member=member,
                                         density=density, step=step, split=split, loss=1.0 - a,
                                         accuracy=a, early_stop_step=20 - 10 * (s % 2),  # min val loss
                                         wall_s=1.0))
                for layer, d in (("dense_0/kernel", density), ("output/kernel", 0.9 ** level)):
                    sp.append(dict(level=level, arm=arm, seed=s, member=member, layer=layer, kind="dense",
                                   shape="4x4", count=16, nonzero=int(16 * d), kept=int(16 * d), density=d,
                                   prunable=True))
        store.write_level(level, {"metrics.parquet": parquet_bytes(pd.DataFrame(rows)),
                                  "sparsity.parquet": parquet_bytes(pd.DataFrame(sp))})
    # an incomplete level must be ignored
    (store.path / f"level_{LEVELS:03d}").mkdir()
    return root


def test_summary_means_std_and_ci(store_root):
    s = summarize(load_runs(store_root))
    assert len(s) == 1 + (LEVELS - 1) * len(ARMS)  # one row per (arm, level)
    row = s[(s.arm == "random_prune") & (s.level == 2)].iloc[0]
    finals = [acc("random_prune", 2, seed, 20) for seed in SEEDS]
    assert row["final_accuracy_mean"] == pytest.approx(np.mean(finals))
    assert row["final_accuracy_std"] == pytest.approx(np.std(finals, ddof=1))
    half = 4.302652729911275 * np.std(finals, ddof=1) / np.sqrt(3)  # t(0.975, df=2)
    assert row["final_accuracy_ci_high"] == pytest.approx(np.mean(finals) + half)
    assert row["early_stop_step_mean"] == pytest.approx(np.mean([20, 10, 20]))
    assert row["density"] == pytest.approx(0.64) and row["seeds"] == 3


def test_accuracy_figure_plots_the_summary_means(store_root):
    df = load_runs(store_root)
    s = summarize(df)
    fig = figures.accuracy_vs_density(df)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    ticket = s[s.arm == "ticket"].sort_values("density", ascending=False)
    np.testing.assert_allclose(lines["winning ticket"].get_ydata(), 100 * ticket["final_accuracy_mean"])
    np.testing.assert_allclose(lines["winning ticket"].get_xdata(), ticket["density"])
    # the control's line starts at the shared dense network
    rp = lines["random pruning"]
    assert rp.get_xdata()[0] == 1.0 and len(rp.get_xdata()) == LEVELS
    assert ax.get_xscale() == "log" and "weights remaining" in ax.get_xlabel()
    assert "3 seeds" in ax.get_legend().get_title().get_text()


def test_early_stop_and_learning_curves_and_layer_profile(store_root):
    df = load_runs(store_root)
    fig = figures.early_stop_vs_density(df)
    ys = fig.axes[0].get_lines()[0].get_ydata()
    assert np.allclose(ys, np.mean([20, 10, 20]))
    fig = figures.learning_curves(df, "ticket")
    first = fig.axes[0].get_lines()[0]
    np.testing.assert_allclose(first.get_xdata(), [10, 20])
    np.testing.assert_allclose(first.get_ydata(), [100 * np.mean([acc("ticket", 0, s, st) for s in SEEDS])
                                                   for st in (10, 20)])
    fig = figures.layer_density_profile(load_sparsity(store_root))
    lines = {ln.get_label(): ln.get_ydata() for ln in fig.axes[0].get_lines()}
    np.testing.assert_allclose(lines["output/kernel"], [100 * 0.9 ** lv for lv in range(LEVELS)])


def test_report_writes_figures_tables_and_readme(store_root, tmp_path):
    made = write_report(store_root, tmp_path)
    assert {"accuracy_vs_density", "early_stop_vs_density", "layer_density_profile"} <= set(made)
    for stem in made:
        for ext in ("pdf", "png"):
            assert (tmp_path / f"{stem}.{ext}").stat().st_size > 1000
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert len(summary) == 1 + (LEVELS - 1) * len(ARMS)
    assert "\\begin{tabular}" in (tmp_path / "summary.tex").read_text()
    assert "| weights remaining (%)" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "paired_differences.csv").is_file() and (tmp_path / "paired_differences.tex").is_file()
    readme = (tmp_path / "README.md").read_text()
    assert all(f"`{stem}.pdf`" in readme for stem in made)


def test_quant_figures_plot_the_group_means_and_the_pareto_front(store_root, tmp_path):
    import shutil
    from analysis import load_quant
    root = tmp_path / "store"
    shutil.copytree(store_root, root)
    rows = [dict(run_id=RUN, level=lv, arm="ticket", seed=s, density=0.8 ** lv, bits=b, scheme="sym",
                 granularity="channel", calibration="minmax", method="ptq", accuracy=0.5 + 0.05 * b - 0.01 * s,
                 float_accuracy=0.9, size_bytes=100 * b * (lv + 1), compression=10.0)
            for lv in (1, 2) for s in SEEDS for b in (2, 4, 8)]
    (root / RUN / "level_001" / "quant.parquet").write_bytes(parquet_bytes(pd.DataFrame(rows[:9])))
    (root / RUN / "level_002" / "quant.parquet").write_bytes(parquet_bytes(pd.DataFrame(rows[9:])))
    q = load_quant(root)
    assert len(q) == 18 and (q["experiment"] == "synthetic").all()
    fig = figures.quant_heatmap(q)
    table = fig.heatmap_table
    assert table.loc[4, 0.8] == pytest.approx(0.5 + 0.2 - 0.01)  # mean over seeds 0, 1, 2
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), 100 * table.to_numpy())
    both = load_runs(root)
    assert set(both["method"]) == {"float", "ptq"} and both[both.method == "ptq"]["train.lr"].eq(0.1).all()
    assert (both[both.method == "float"]["bits"] == 32).all()
    fig = figures.accuracy_vs_size(both)
    front, points = fig.pareto_front, fig.points
    assert front["size_bytes"].is_monotonic_increasing and front["accuracy"].is_monotonic_increasing
    assert len(points) == 6  # (level 1, 2) x (2, 4, 8 bits); float rows have no measured size here
    p = points[(points.level == 1) & (points.bits == 4)].iloc[0]
    assert p.accuracy == pytest.approx(0.69) and p.rule == "95% CI over 3 seeds"
    assert p.low == pytest.approx(0.69 - 4.302653 * 0.01 / np.sqrt(3), abs=1e-6)
    # below 3 seeds the spread is min-max (a 2-seed t-interval is 12.7 standard errors wide)
    assert figures.seed_spread([0.5, 0.7]) == (pytest.approx(0.6), 0.5, 0.7, "min-max over 2 seeds")
    s = summarize(load_runs(root))  # 3 seeds: the figures' spread is the 95% CI; with 2 seeds, min-max
    assert np.allclose(s.final_accuracy_spread_low, s.final_accuracy_ci_low)
    two = summarize(load_runs(root).query("seed < 2"))
    assert np.allclose(two.final_accuracy_spread_low, two.final_accuracy_mean - two.final_accuracy_std / np.sqrt(2))
    made = write_report(root, tmp_path / "figs")
    assert {"quant_heatmap", "accuracy_vs_size"} <= set(made)


def test_early_stop_is_selected_on_validation_and_test_is_read_at_that_step(store_root, tmp_path):
    from analysis.summary import per_seed
    df = load_runs(store_root)
    seeds = per_seed(df).set_index(["arm", "level", "seed"])
    odd, even = seeds.loc[("ticket", 1, 1)], seeds.loc[("ticket", 1, 2)]
    # seed 1: validation peaks at step 10 although test accuracy still rises to step 20
    assert odd["early_stop_step"] == 10 and not odd["still_improving"]
    assert odd["early_stop_test_accuracy"] == pytest.approx(acc("ticket", 1, 1, 10))
    assert odd["early_stop_val_accuracy"] == pytest.approx(val_acc("ticket", 1, 1, 10))
    # seed 2: the peak is the last evaluated step: still improving, not stopped early
    assert even["early_stop_step"] == 20 and even["still_improving"] and even["last_step"] == 20
    s = summarize(df)
    assert not [c for c in s.columns if c.startswith("best_accuracy")]  # no test-set maximum
    row = s[(s.arm == "ticket") & (s.level == 1)].iloc[0]
    assert row["early_stop_test_accuracy_mean"] == pytest.approx(
        np.mean([acc("ticket", 1, 0, 20), acc("ticket", 1, 1, 10), acc("ticket", 1, 2, 20)]))
    assert row["still_improving"] == 2 and row["early_stop_step_n"] == 3
    _write_tables(s, tmp_path, "summary")
    md = (tmp_path / "summary.md").read_text()
    assert "still improving 2/3" in md and "stopped early" not in md and "peak validation accuracy" in md


def test_early_stop_can_select_on_validation_loss_and_never_on_test():
    from analysis.summary import per_seed
    rows = []
    points = {10: (0.3, 0.70, 0.50), 20: (0.4, 0.80, 0.60), 30: (0.5, 0.75, 0.90)}  # val loss, val acc, test acc
    for step, (val_loss, val_a, test_a) in points.items():
        rows += [dict(run_id="r", experiment="e", arm="ticket", level=1, seed=0, density=0.5, step=step, split="val",
                      loss=val_loss, accuracy=val_a),
                 dict(run_id="r", experiment="e", arm="ticket", level=1, seed=0, density=0.5, step=step, split="test",
                      loss=1.0, accuracy=test_a)]
    df = pd.DataFrame(rows)
    by_acc, by_loss = per_seed(df).iloc[0], per_seed(df, select="loss").iloc[0]
    assert by_acc["early_stop_step"] == 20 and by_acc["early_stop_test_accuracy"] == pytest.approx(0.60)
    assert by_loss["early_stop_step"] == 10 and by_loss["early_stop_test_accuracy"] == pytest.approx(0.50)
    assert not by_acc["still_improving"] and by_acc["final_accuracy"] == pytest.approx(0.90)
    no_val = per_seed(df[df["split"] == "test"]).iloc[0]  # nothing to select on: not the test peak
    assert np.isnan(no_val["early_stop_step"]) and np.isnan(no_val["early_stop_test_accuracy"])
    with pytest.raises(ValueError, match="select = 'test'.*accuracy, loss"):
        per_seed(df, select="test")


def test_summary_tables_are_paper_tables_in_percent_with_n_and_min_max(store_root, tmp_path):
    from analysis.tables import summary_tables
    s = summarize(load_runs(store_root))
    assert s["final_accuracy_mean"].between(0, 1).all()  # fractions in the DataFrame
    caption, t = summary_tables(s)[1]  # final test accuracy
    assert list(t.columns) == ["weights remaining (%)", "ticket", "random_prune"]  # rows: density; columns: arms
    assert list(t["weights remaining (%)"]) == ["100 (dense)", "80", "64", "51.2"]  # dense its own first row
    assert t.iloc[0]["random_prune"] == ""  # the dense network is not a random_prune result
    finals = [100 * acc("random_prune", 2, s_, 20) for s_ in SEEDS]
    half = 4.302652729911275 * np.std(finals, ddof=1) / np.sqrt(3)
    assert t.iloc[2]["random_prune"] == f"{np.mean(finals):.2f} ± {half:.2f} ({min(finals):.2f}–{max(finals):.2f})"
    assert "n = 3 seeds" in caption and "(%)" in caption
    two = summary_tables(summarize(load_runs(store_root).query("seed < 2")))[1][1]
    assert "±" not in two.iloc[2]["random_prune"] and "–" in two.iloc[2]["random_prune"]  # no CI below 3 seeds
    two_s = summarize(load_runs(store_root).query("seed < 2"))
    assert two_s["final_accuracy_ci_low"].isna().all()
    assert (two_s["final_accuracy_min"] <= two_s["final_accuracy_max"]).all()


def test_paired_differences_match_arms_by_run_level_and_seed(store_root, tmp_path):
    from analysis.summary import paired_differences
    df = load_runs(store_root)
    d = paired_differences(df.query("not (arm == 'random_prune' and seed == 2 and level == 3)"))
    assert set(d["arm"]) == {"random_prune"} and set(d["reference"]) == {"ticket"} and 0 not in set(d["level"])
    one = d[(d.level == 2) & (d.metric == "final_accuracy")].iloc[0]
    diffs = [acc("ticket", 2, s_, 20) - acc("random_prune", 2, s_, 20) for s_ in SEEDS]
    assert one["n"] == 3 and one["diff_mean"] == pytest.approx(np.mean(diffs))
    assert one["diff_min"] == pytest.approx(min(diffs)) and one["diff_ci_low"] == pytest.approx(np.mean(diffs))
    three = d[(d.level == 3) & (d.metric == "final_accuracy")].iloc[0]
    assert three["n"] == 2 and np.isnan(three["diff_ci_low"])  # seed 2 has no control: 2 pairs, no CI
    with pytest.raises(ValueError, match="reference = 'tickt' is not an arm.*random_prune, ticket"):
        paired_differences(df, reference="tickt")
    es = d[(d.level == 1) & (d.metric == "early_stop_test_accuracy")].iloc[0]
    assert es["diff_mean"] == pytest.approx(0.05)  # both arms stop on the same val peak per seed
    _write_tables(summarize(df), tmp_path, "summary", paired_differences(df))
    csv = pd.read_csv(tmp_path / "paired_differences.csv")
    assert len(csv) == 2 * (LEVELS - 1)
    md = (tmp_path / "paired_differences.md").read_text()
    assert "ticket - random_prune" in md and "+5.00" in md and "n = 3 pairs" in md
    assert "random\\_prune" in (tmp_path / "paired_differences.tex").read_text()


def test_latex_escape_makes_text_safe():
    from analysis.tables import latex_escape, latex_table
    assert latex_escape("acc (%)") == r"acc (\%)"
    assert latex_escape("random_prune") == r"random\_prune"
    assert latex_escape("a&b#c$d{e}~^\\") == r"a\&b\#c\$d\{e\}\textasciitilde{}\textasciicircum{}\textbackslash{}"
    assert latex_escape("1.0 ± 0.2 (0.8–1.2)") == r"1.0 \ensuremath{\pm} 0.2 (0.8--1.2)"
    tex = latex_table(pd.DataFrame({"weights remaining (%)": [50.0], "arm_name": ["random_prune"]}), "n = 3 (%)")
    assert r"weights \\ remaining (\%)\end{tabular} & arm\_name \\" in tex and r"\caption{n = 3 (\%)}" in tex
    assert "%" not in tex.replace(r"\%", "")  # no bare % left to comment out a row


def _store_with_quant_and_speed(store_root, root):
    """A copy of the synthetic store with quant cells (sizes, so smallest_within_1pp has rows) and speed tables."""
    import shutil
    shutil.copytree(store_root, root)
    for lv in range(3):
        arms = ["ticket"] if lv == 0 else ARMS
        q = [dict(run_id=RUN, level=lv, arm=a, seed=s_, density=0.8 ** lv, bits=b, scheme="sym",
                  granularity="channel", calibration="minmax", method="ptq", accuracy=0.9 - 0.02 * (8 - b) - 0.01 * s_,
                  float_accuracy=0.9, size_bytes=10 * b * (3 - lv), compression=10.0,
                  float_size_bytes=320 * (3 - lv), fp32_dense_bytes=960)
             for a in arms for s_ in SEEDS for b in (4, 8)]
        (root / RUN / f"level_{lv:03d}" / "quant.parquet").write_bytes(parquet_bytes(pd.DataFrame(q)))
        sp = [dict(run_id=RUN, experiment="synthetic_exp", model="mlp", member=0, format=f, batch=1, level=lv,
                   density=0.8 ** lv, bytes=100, latency_s=1e-3 * (1 + lv), speedup=1.0 if f == "dense" else 1.1)
              for f in ("dense", "bcoo")]
        (root / RUN / f"level_{lv:03d}" / "speed.parquet").write_bytes(parquet_bytes(pd.DataFrame(sp)))
    return root


def test_every_latex_table_of_the_report_compiles(store_root, tmp_path):
    import shutil
    import subprocess
    root = _store_with_quant_and_speed(store_root, tmp_path / "store")
    out = tmp_path / "report"
    write_report(root, out)
    tables = sorted(out.glob("*.tex"))
    names = {p.stem for p in tables}
    assert {"summary", "paired_differences", "smallest_within_1pp", "speed"} <= names, names
    assert "random\\_prune" in (out / "smallest_within_1pp.tex").read_text()
    # a run of 6 arms (3 seeds): its summary and paired tables are in panels of PANEL_ARMS arms
    wide = tmp_path / "wide"
    wide.mkdir()
    from analysis.summary import paired_differences
    runs6 = _six_arm_runs()
    _write_tables(summarize(runs6), wide, "summary", paired_differences(runs6))
    assert (wide / "summary.tex").read_text().count("\\par\\medskip") == 3  # 3 tables, 2 panels each
    tables += [wide / "summary.tex", wide / "paired_differences.tex"]
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed (Debian: texlive-latex-base texlive-latex-recommended)")
    for k, tex in enumerate(tables):
        doc = tmp_path / f"doc{k}_{tex.stem}.tex"
        doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                       f"\\input{{{tex}}}\n\\end{{document}}\n")
        r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{tex.name}:\n{r.stdout[-2000:]}"
        assert (tmp_path / f"{doc.stem}.pdf").stat().st_size > 1000
        log = (tmp_path / f"{doc.stem}.log").read_text(errors="replace")
        assert "Missing character" not in log, tex.name
        if tex.stem in ("smallest_within_1pp", "paired_differences", "summary"):  # they fit an article page
            assert "Overfull \\hbox" not in log, (tex, log[log.find("Overfull"):][:200])


def _six_arm_runs() -> pd.DataFrame:
    """A load_runs-like table of one run with 6 arms, 3 seeds and 4 levels (wide spreads: long cells)."""
    arms = ["ticket", "reinit", "random_prune", "shuffle", "small_dense", "snip"]
    rows = [dict(run_id="abcdef123456", experiment="synthetic_experiment", level=lv, arm=a, seed=s,
                 density=0.8 ** lv, step=step, split=split, method="float",
                 accuracy=0.9 - 0.01 * s - 0.0123 * lv - (0.1 if step == 10000 else 0)
                 + (0.2 if s % 2 and step == 10000 and split == "val" else 0), loss=0.5)
            for lv in range(4) for a in (["ticket"] if lv == 0 else arms) for s in range(3)
            for step in (10000, 20000) for split in ("val", "test")]
    return pd.DataFrame(rows)


def test_a_sweep_keeps_its_runs_apart_with_the_swept_key_as_a_column(store_root, tmp_path):
    import shutil
    from analysis.tables import summary_tables
    root = tmp_path / "store"
    shutil.copytree(store_root, root)
    other = {**HPARAMS, "train": {"lr": 0.2}}
    run2 = ExperimentConfig.from_dict(other).run_id
    store = RunStore(root, run2)
    store.path.mkdir()
    (store.path / "hparams.json").write_text(json.dumps({**other, "run_id": run2}))
    for level in range(LEVELS):
        m = pd.read_parquet(root / RUN / f"level_{level:03d}" / "metrics.parquet").assign(run_id=run2)
        m["accuracy"] -= 0.1
        store.write_level(level, {"metrics.parquet": parquet_bytes(m)})
    s = summarize(load_runs(root))
    assert "train.lr" in s and set(s["train.lr"]) == {0.1, 0.2} and len(s) == 2 * (1 + (LEVELS - 1) * len(ARMS))
    first = s[(s.run_id == RUN) & (s.arm == "ticket") & (s.level == 1)].iloc[0]
    assert first["final_accuracy_mean"] == pytest.approx(np.mean([acc("ticket", 1, s_, 20) for s_ in SEEDS]))
    captions = [c for c, _ in summary_tables(s)]
    assert len(captions) == 6 and sum("train.lr = 0.2" in c for c in captions) == 3  # one set of tables per run


def test_run_table_labels_a_run_stored_before_a_setting_existed_with_its_legacy_value(tmp_path):
    """A pai run stored before prune.pai_allocation existed was computed with 'ticket' (the legacy value),
    not today's default 'global': the runs table must say so."""
    from analysis.runs import run_table
    from lth.config import stored_run_id

    cfg = ExperimentConfig.from_dict({"name": "old", "arms": ["ticket", "snip"], "prune": {"levels": 1}})
    h = cfg.to_dict()
    assert h["prune"]["pai_allocation"] == "global"
    del h["prune"]["pai_allocation"]  # as an older lth wrote it
    run = tmp_path / stored_run_id(h)
    run.mkdir()
    (run / "hparams.json").write_text(json.dumps(h))
    table = run_table(tmp_path)
    assert table["prune.pai_allocation"].tolist() == ["ticket"]
    assert table["prune.grasp_temperature"].tolist() == [200.0]  # not a grasp run: its default
