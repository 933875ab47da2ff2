"""One swept_keys: analysis.summary's is analysis.runs' plus the level count where runs differ in it."""

import pandas as pd

from analysis import runs, summary


def _rows(run_id, lr, levels, wandb, widths, rate=0.2):
    return [dict(run_id=run_id, experiment="e", arm="ticket", level=lv, seed=s, density=0.8 ** lv, step=st,
                 split=sp, accuracy=0.9 - 0.01 * s, loss=0.3, method="float", **{
                     "train.lr": lr, "prune.levels": levels, "log.wandb": wandb, "model.widths": widths,
                     "prune.rate": rate})
            for lv in range(2) for s in range(2) for st in (10, 20) for sp in ("val", "test")]


def test_summary_swept_keys_calls_the_runs_one_and_keeps_the_level_count():
    df = pd.DataFrame(_rows("a", 0.1, 3, "offline", (24, 16)) + _rows("b", 0.01, 5, "disabled", (24, 16)))
    assert runs.swept_keys(df) == ["train.lr"]  # labels: what changes results only
    assert summary.swept_keys(df) == ["train.lr", "prune.levels"]  # not log.wandb (it was listed before)
    s = summary.summarize(df)
    assert {"train.lr", "prune.levels"} <= set(s.columns) and "log.wandb" not in s.columns
    assert s.set_index("run_id")["prune.levels"].to_dict() == {"a": 3, "b": 5}
    assert s["seeds"].tolist() == [2] * len(s)  # summarize's own seed count, not a setting
    one = pd.DataFrame(_rows("a", 0.1, 3, "offline", (24, 16)))
    assert summary.swept_keys(one) == [] and runs.swept_keys(one) == []
