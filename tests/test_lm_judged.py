"""A language model is judged by bits per byte everywhere: the quant stage's rows and log lines, the
report's figures and tables (lower is better, named on the axis) and the progress bar."""

import math

import numpy as np
import pandas as pd
import pytest
from helpers import tiny, tiny_gpt_lottery

from lth.data import load_dataset
from lth.lottery import run_lottery
from lth.stored import StoredRun


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny GPT: dense level 0 and one level of ticket + random_prune, on a small UTF-8 corpus."""
    root = tmp_path_factory.mktemp("lm")
    words = "the lottery ticket hypothesis says dense networks contain sparse subnetworks that train well".split()
    rng = np.random.default_rng(0)
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 1500)) + "\n", encoding="utf-8")
    cfg = tiny_gpt_lottery(corpus)
    load_dataset.cache_clear()
    store = run_lottery(cfg, root / "runs")
    return root / "runs", store.path


def test_quant_rows_of_a_language_model_carry_bits_per_byte(lm_run):
    from lth.quant.stage import COLUMNS, quantize_run
    _, path = lm_run
    lines = []
    rows = quantize_run(path, levels=[1], bits_list=[4], methods=["ptq", "qat"], qat_steps=3, log=lines.append)
    assert set(COLUMNS) <= set(rows.columns)
    assert set(rows["method"]) == {"ptq", "qat", "float_ft"}
    for split in ("", "val_"):
        loss = rows[f"{split}loss"].to_numpy()
        assert np.isfinite(loss).all() and (loss > 0).all()
        np.testing.assert_allclose(rows[f"{split}perplexity"], np.exp(loss), rtol=1e-9)
        np.testing.assert_allclose(rows[f"{split}bits_per_byte"], loss / math.log(2), rtol=1e-9)
    # the float reference is the trained member evaluated on training's own fixed windows
    metrics = StoredRun.open(path).metrics(1)
    for arm in ("ticket", "random_prune"):
        m = metrics[(metrics["arm"] == arm) & (metrics["split"] == "test")].sort_values("step")
        ref = rows.loc[rows["arm"] == arm, "float_bits_per_byte"]
        np.testing.assert_allclose(ref, float(m["bits_per_byte"].iloc[-1]), rtol=1e-5)
    # the quantized network is another function than the float one
    ptq = rows[rows["method"] == "ptq"]
    assert (ptq["bits_per_byte"] != ptq["float_bits_per_byte"]).all()
    # every log line judges in bits per byte, never a percentage
    assert len(lines) == 2 * 3 and all("bits per byte" in x and "lower is better" in x and "%" not in x
                                       for x in lines)
    assert all("float_ft" in x and "not computed" not in x for x in lines if " qat " in x)


def test_classifier_quant_rows_have_a_loss_but_no_bits_per_byte(tmp_path):
    from lth.quant.stage import quantize_run
    store = run_lottery(tiny(seeds=[0], arms=["ticket"], prune={"levels": 1}, train={"steps": 10}), tmp_path)
    lines = []
    rows = quantize_run(store.path, levels=[1], bits_list=[8], methods=["ptq"], log=lines.append)
    assert np.isfinite(rows["loss"]).all() and np.isfinite(rows["val_loss"]).all()
    assert rows[["perplexity", "bits_per_byte", "float_bits_per_byte"]].isna().all().all()
    assert "test acc" in lines[0] and "%" in lines[0]


def test_progress_bar_shows_bits_per_byte_for_a_language_model():
    from lth.lottery.runner import progress_postfix
    m = {"train": (1.5, 0.4), "val": (math.log(2) * 2.5, 0.3), "test": (math.log(2) * 3.0, 0.2)}
    assert progress_postfix(m, lm=True) == {"loss": "1.500", "val_bpb": "2.500", "test_bpb": "3.000"}
    assert progress_postfix(m) == {"loss": "1.500", "val_acc": "30.00%", "test_acc": "20.00%"}


def test_report_of_a_language_model_judges_by_bits_per_byte(lm_run, tmp_path):
    import matplotlib.pyplot as plt

    from analysis import figures, load_runs
    from analysis.report import write_report
    from lth.quant.stage import quantize_run
    root, path = lm_run
    quantize_run(path, levels=[1], bits_list=[8], methods=["ptq"])
    made = write_report(root, tmp_path / "report")
    assert {"bits_per_byte_vs_density", "early_stop_bits_per_byte_vs_density", "learning_curves_ticket",
            "bits_per_byte_vs_bits"} <= set(made)
    assert not {"accuracy_vs_density", "accuracy_vs_size", "accuracy_vs_bits", "quant_heatmap"} & set(made)
    assert all("bits per byte (lower is better)" in made[k] for k in made if "bits_per_byte" in k or "curves" in k)
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "bits per byte (lower is better)" in summary and "accuracy (%)" not in summary
    assert "minimum validation loss" in summary and "peak validation accuracy" not in summary
    assert "final_bits_per_byte" in (tmp_path / "report" / "README.md").read_text()
    df = load_runs(root)
    fig = figures.bits_per_byte_vs_density(df)
    ax = fig.axes[0]
    assert "bits per byte" in ax.get_ylabel() and "lower is better" in ax.get_ylabel()
    assert "bits per byte" in ax.get_title()
    # the dense point is the final test bits per byte of level 0 (one seed: the value itself)
    m = StoredRun.open(path).metrics(0)
    final = m[m["split"] == "test"].sort_values("step")["bits_per_byte"].iloc[-1]
    ticket = next(line for line in ax.lines if getattr(line, "arm", None) == "ticket")
    assert ticket.get_ydata()[0] == pytest.approx(final, rel=1e-9)
    plt.close(fig)
    fig = figures.bits_per_byte_vs_bits(df[df["run_id"] == path.name])
    assert "bits per byte" in fig.axes[0].get_ylabel()
    drawn = [line for ax in fig.axes for line in ax.lines if getattr(line, "method", None) == "ptq"]
    assert drawn and max(drawn[0].get_ydata()) < 9  # bits per byte, not a percentage
    plt.close(fig)


def test_run_summary_of_a_language_model_prints_bits_per_byte(lm_run, capsys):
    from lth.cli.common import print_summary
    _, path = lm_run
    print_summary(path, 1.0)
    out = capsys.readouterr().out
    assert "bits_per_byte" in out and "accuracy" not in out
    m = StoredRun.open(path).metrics(0)
    final = m[m["split"] == "test"].sort_values("step")["bits_per_byte"].iloc[-1]
    assert f"{final:.2f}" in out


def test_lth_quantize_prints_bits_per_byte_for_a_language_model(lm_run, capsys):
    from lth.cli import main
    _, path = lm_run
    assert main(["quantize", str(path), "--levels", "1", "--bits", "8", "--method", "ptq", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "bits_per_byte" in out.splitlines()[0] and "accuracy" not in out.splitlines()[0]


def test_wandb_gets_a_language_model_bits_per_byte(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from test_wandb_log import _metric_rows, offline_runs

    from lth.wandb_log import WandbSink
    run_dir = tmp_path / "runs" / "lm1"
    sink = WandbSink("offline", "lth-test", "tiny", "lm1", {}, run_dir)
    rows = [{**r, "bits_per_byte": r["loss"] / math.log(2), "perplexity": math.exp(r["loss"])}
            for r in _metric_rows(0, "ticket", 0, 1.0)]
    sink.log_level(0, 20, rows)
    sink.log_quant(0, pd.DataFrame([{"run_id": "lm1", "cell": "c", "level": 0, "arm": "ticket", "seed": 0, "bits": 8,
                                     "method": "ptq", "scheme": "sym", "accuracy": 0.4, "float_accuracy": 0.41,
                                     "bits_per_byte": 2.5, "float_bits_per_byte": 2.4}]))
    sink.close()
    t = offline_runs(run_dir)["lm1/ticket/0"]
    curve = [h["test/bits_per_byte"] for h in t["history"] if "test/bits_per_byte" in h]
    assert curve == pytest.approx([(1 - 0.71) / math.log(2), (1 - 0.72) / math.log(2)])
    assert t["summary"]["quant/level_000/ptq/w8/bits_per_byte"] == 2.5
    assert t["summary"]["quant/level_000/ptq/w8/float_bits_per_byte"] == 2.4
