"""Analysis from a small synthetic store: summaries, plotted data, report files."""

import json

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import figures, load_runs, load_sparsity, summarize  # noqa: E402
from analysis.report import write_report  # noqa: E402
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
                        rows.append(dict(run_id=RUN, level=level, arm=arm, seed=s, member=member,
                                         density=density, step=step, split=split, loss=1.0 - acc(arm, level, s, step),
                                         accuracy=acc(arm, level, s, step), early_stop_step=10 + 10 * (s % 2),
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
    assert row["early_stop_step_mean"] == pytest.approx(np.mean([10, 20, 10]))
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
    assert np.allclose(ys, np.mean([10, 20, 10]))
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
    assert "| experiment" in (tmp_path / "summary.md").read_text()
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
