"""What a user sees of a run (issue 21 items 6, 8, 10, 11): the rows a call returns, the warning
about too few evaluations, the sweep bar's stage, and the W&B runs. One tiny stored run serves all."""

import json

import pytest

import lth
from lth.cli import main
from lth.lottery.runner import Lottery, few_evals_warning
from lth.sweep import run_stage, stages_text
from helpers import tiny
from test_wandb_log import offline_runs

SETTINGS = dict(seeds=[0, 1], arms=["ticket", "small_dense"], prune={"levels": 1},
                train={"steps": 20, "eval_every": 10}, log={"wandb": "offline", "progress": False})


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A run that holds more than most calls below ask for: 2 seeds, levels 0-1, ticket and small-dense
    (trained through the pipeline with W&B offline)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    out = tmp_path_factory.mktemp("console") / "runs"
    exp = lth.Experiment(tiny(**SETTINGS))
    exp.run(out)
    mp.undo()
    return exp, out


def test_run_and_the_lottery_summary_return_only_the_members_asked_for(stored, tmp_path, capsys):
    exp, out = stored
    full = exp.results(out)
    assert set(full.level) == {0, 1} and set(full.seed) == {0, 1} and set(full.arm) == {"ticket", "small_dense"}
    one = exp.set(seeds=[0], **{"prune.levels": 0}).run(out)  # the store is finished for it: nothing trains
    assert set(zip(one.level, one.arm, one.seed)) == {(0, "ticket", 0)}
    two = exp.set(seeds=[1], arms=["ticket"]).run(out)
    assert set(zip(two.level, two.arm, two.seed)) == {(0, "ticket", 1), (1, "ticket", 1)}
    assert sorted(p.name for p in (out / exp.run_id).glob("level_*")) == ["level_000", "level_001"]
    # the CLI's summary table: one level, one arm, one seed
    path = tmp_path / "exp.toml"
    path.write_text("name = 'tiny'\n")
    sets = [f"{k}={json.dumps(v)}" for k, v in exp.set(seeds=[0], arms=["ticket"]).to_dict().items()
            if not isinstance(v, dict)]
    sets += [f"{sec}.{k}={json.dumps(v)}" for sec, d in exp.to_dict().items() if isinstance(d, dict)
             for k, v in d.items()]
    argv = ["lottery", str(path), "--out", str(out), "--no-progress", *(a for s in sets for a in ("--set", s))]
    assert main(argv + ["--set", "prune.levels=0"]) == 0
    printed = capsys.readouterr().out
    assert f"run {exp.run_id}:" in printed
    table = [line.split() for line in printed.splitlines()[2:] if line.strip()]
    assert [(r[2], r[3], r[-1]) for r in table] == [("0", "ticket", "1")]  # level, arm, seeds


def test_too_few_evaluations_warn_once_before_training(tmp_path, capfd, monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("training started")

    monkeypatch.setattr(Lottery, "train_level", boom)
    cfg = tiny(seeds=[0], arms=["ticket"], train={"steps": 20, "eval_every": 20}, prune={"levels": 2})
    with pytest.raises(RuntimeError, match="training started"):
        lth.Experiment(cfg).run(tmp_path)
    lines = [x for x in capfd.readouterr().err.splitlines() if "warning" in x]
    assert len(lines) == 1
    assert "train.eval_every = 20 >= the 20 steps of a level" in lines[0] and "no learning curve" in lines[0]
    assert "early-stop step is always the last step" in lines[0] and "--set train.eval_every=2" in lines[0]
    # the default (once per epoch) at 1 epoch a level; a late rewind point shortens levels >= 1
    epochs = tiny(train={"steps": None, "epochs": 1, "eval_every": None})
    assert "one evaluation per epoch (916 steps) >= the 916 steps" in few_evals_warning(epochs, 916, 916)
    assert few_evals_warning(tiny(), 40, 50) is None  # steps 40, eval_every 20: two points a level
    late = tiny(rewind={"step": 25})
    assert "the 15 steps of a level" in few_evals_warning(late, 40, 50)


def test_the_sweep_bar_names_the_stage(stored, monkeypatch):
    exp, out = stored
    cfg = exp.config
    assert run_stage(cfg, out) == (2, None)
    assert run_stage(exp.set(**{"prune.levels": 3}).config, out) == (2, "train level 2/3")
    assert run_stage(exp.set(seeds=[0, 1, 2]).config, out) == (0, "train level 0/1")  # grows by a seed
    assert run_stage(exp.set(**{"quant.bits": [8, 4]}).config, out) == (0, "quant level 0 (2 cells)")
    last = exp.set(**{"quant.bits": [8], "quant.levels": "last"}).config
    assert run_stage(last, out) == (1, "quant level 1 (2 cells)")  # ticket and small_dense
    import lth.sweep
    monkeypatch.setattr(lth.sweep, "stability_pending", lambda c, d, levels: [lv for lv in levels if lv == 1])
    assert run_stage(cfg, out) == (1, "stability level 1")
    assert run_stage(cfg, out, start=2) == (2, None)
    assert stages_text(["train level 2/5"] * 3 + ["quant level 1 (4 cells)"]) == \
        "train level 2/5 in 3 runs, quant level 1 (4 cells)"
    assert stages_text([]) == ""


def test_every_member_is_a_wandb_run_grouped_by_run_id(stored):
    exp, out = stored
    rid = exp.run_id
    runs = offline_runs(out / rid)
    assert set(runs) == {f"{rid}/{arm}/{seed}" for arm in ("ticket", "small_dense") for seed in (0, 1)}
    assert {r["group"] for r in runs.values()} == {rid}
    small = runs[f"{rid}/small_dense/1"]
    levels = small["tables"]["levels"]
    assert [row[levels["columns"].index("level")] for row in levels["data"]] == [1]
    ticket = runs[f"{rid}/ticket/0"]
    assert ticket["summary"]["masks/dense_0/kernel/density"] < 1  # a real level's mask summary (no W&B failure)
    rows = ticket["tables"]["levels"]["data"]
    assert [row[0] for row in rows] == [0, 1]  # one table over the levels
    steps = [h["global_step"] for h in ticket["history"] if "global_step" in h]
    assert steps == sorted(steps) and len(steps) == 4  # 2 evaluations a level, levels 0 and 1


def test_the_sweep_bar_shows_the_busy_runs_stage_and_no_rate_before_a_pruned_level(stored, tmp_path, capsys):
    from lth.cli.sweep import _SweepBar
    from lth.store import RunStore
    from lth.sweep import SweepPoint
    import shutil
    exp, stored_out = stored
    out = tmp_path / "runs"  # a copy: this test adds a level
    shutil.copytree(stored_out / exp.run_id, out / exp.run_id, ignore=shutil.ignore_patterns("wandb"))
    point = SweepPoint(("prune.levels=3",), exp.set(**{"prune.levels": 3}).config)
    bar = _SweepBar([point], out, enabled=True)
    bar.POLL_S = 3600  # refreshed by hand below
    with RunStore(out, exp.run_id).lock():  # the run is busy: its stage shows
        with bar:
            assert bar.bar.n == 2 and bar.bar.initial == 2  # levels done before: not part of the rate
            bar._refresh()
            assert bar.bar.desc == "sweep: train level 2/3: "  # tqdm adds ': '
            assert bar.bar.format_dict["rate"] is None and not bar.warm
            (out / exp.run_id / "level_002").mkdir()  # a pruned level completes (a copy of level 1's files)
            for f in (out / exp.run_id / "level_001").iterdir():
                (out / exp.run_id / "level_002" / f.name).write_bytes(f.read_bytes())
            bar._refresh()
            assert bar.warm and (bar.bar.n, bar.bar.initial) == (3, 3)  # the clock restarts after compiling
            assert bar.bar.desc == "sweep: train level 3/3: "
    assert "sweep: train level 2/3" in capsys.readouterr().err
