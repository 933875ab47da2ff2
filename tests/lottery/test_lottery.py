"""IMP end to end on a tiny MNIST-1D MLP: rewinding, nested masks, exact rates, controls, resume."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pandas as pd
import pytest

from analysis import NotAStoreError, load_runs
from lth.lottery import Lottery, run_lottery
from lth.prune.masks import expected_counts
from lth.store import load_tree
from lth.train import unstack

from helpers import TINY, tiny, toml_text

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    cfg = tiny()
    store = run_lottery(cfg, out)
    return cfg, out, store


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_densities_follow_the_schedule_to_the_weight(finished):
    cfg, out, store = finished
    df = load_runs(out)
    assert sorted(df["level"].unique()) == [0, 1, 2, 3]
    init = load_tree(store.path / "init.msgpack")
    params0 = unstack(init["params"], 0)
    total = sum(p.size for p in leaves(params0) if p.ndim == 2)
    for level in range(4):
        counts = expected_counts(params0, cfg.prune, level)
        want = sum(c for c, p in zip(jax.tree.leaves(counts), leaves(params0)) if p.ndim == 2) / total
        got = df[df["level"] == level]["density"].unique()
        assert got.tolist() == [want]
        masks = load_tree(store.level_dir(level) / "masks.msgpack")
        for k in range(len(cfg.arms) if level else len(cfg.seeds)):
            for m, c in zip(leaves(unstack(masks, k)), jax.tree.leaves(counts)):
                assert int(m.sum()) == c  # every member, every layer: exact count


def test_masks_are_nested_and_controls_share_the_tickets_counts(finished):
    cfg, out, store = finished
    prev = load_tree(store.level_dir(0) / "masks.msgpack")
    for level in (1, 2, 3):
        masks = load_tree(store.level_dir(level) / "masks.msgpack")
        members = pd.read_json(store.level_dir(level) / "members.json")
        for s_i, seed in enumerate(cfg.seeds):
            ticket_k = members.index[(members.arm == "ticket") & (members.seed == seed)][0]
            ticket = leaves(unstack(masks, ticket_k))
            for a, b in zip(ticket, leaves(unstack(prev, s_i))):
                assert np.all(a <= b)  # level L+1 mask <= level L mask
            for arm in ("reinit", "random_prune", "shuffle"):
                k = members.index[(members.arm == arm) & (members.seed == seed)][0]
                other = leaves(unstack(masks, k))
                assert [int(x.sum()) for x in other] == [int(x.sum()) for x in ticket]
                same = all(np.array_equal(x, y) for x, y in zip(other, ticket))
                assert same == (arm == "reinit")
        prev = masks


def test_pruned_weights_are_zero_in_every_stored_final(finished):
    cfg, out, store = finished
    for level in range(4):
        masks = leaves(load_tree(store.level_dir(level) / "masks.msgpack"))
        final = leaves(load_tree(store.level_dir(level) / "final.msgpack")["params"])
        assert len(masks) == len(final) > 0
        assert level == 0 or sum(int((~m).sum()) for m in masks) > 0  # something pruned to check
        for m, p in zip(masks, final):
            assert np.all(p[~m] == 0.0)


def test_rewound_ticket_equals_stored_init_on_survivors(finished):
    cfg, out, store = finished
    lottery = Lottery(cfg, out)
    init = load_tree(store.path / "init.msgpack")
    plan = lottery.prepare_level(2, init)
    state = lottery.initial_state(2, plan)
    for k, m in enumerate(plan.members):
        if m.arm == "reinit":
            continue
        start = leaves(unstack(state.params, k))
        ref = leaves(unstack(init["params"], cfg.seeds.index(m.seed)))
        for s, r, mask in zip(start, ref, leaves(plan.masks[k])):
            np.testing.assert_array_equal(s[mask], r[mask])  # exactly the stored init
            assert np.all(s[~mask] == 0.0)
        assert int(state.step[k]) == 0


def test_late_rewinding_rewinds_to_the_step_k_weights(tmp_path):
    cfg = tiny(prune={"levels": 1}, arms=["ticket"], rewind={"step": 10})
    store = run_lottery(cfg, tmp_path)
    rewind = load_tree(store.path / "rewind.msgpack")
    init = load_tree(store.path / "init.msgpack")
    assert not np.array_equal(leaves(rewind["params"])[0], leaves(init["params"])[0])
    lottery = Lottery(cfg, tmp_path)
    plan = lottery.prepare_level(1, init)
    state = lottery.initial_state(1, plan)
    for k in range(len(plan.members)):
        for s, r, mask in zip(leaves(unstack(state.params, k)), leaves(unstack(rewind["params"], k)),
                              leaves(plan.masks[k])):
            np.testing.assert_array_equal(s[mask], r[mask])
        assert int(state.step[k]) == 10  # the schedule resumes at the rewind step
    df = load_runs(tmp_path)
    assert df[df.level == 1]["step"].min() == 20 and df[df.level == 1]["step"].max() == 40


@pytest.mark.parametrize("mode", ["lr", "finetune"])
def test_lr_rewinding_and_finetuning_keep_trained_weights(tmp_path, mode):
    cfg = tiny(prune={"levels": 1}, arms=["ticket"], rewind={"mode": mode})
    store = run_lottery(cfg, tmp_path)
    lottery = Lottery(cfg, tmp_path)
    plan = lottery.prepare_level(1, load_tree(store.path / "init.msgpack"))
    final0 = load_tree(store.level_dir(0) / "final.msgpack")["params"]
    state = lottery.initial_state(1, plan)
    for s, r, mask in zip(leaves(unstack(state.params, 0)), leaves(unstack(final0, 0)), leaves(plan.masks[0])):
        np.testing.assert_array_equal(s[mask], r[mask])
    if mode == "finetune":
        assert float(plan.engine.lr_fn(0)) == float(plan.engine.lr_fn(39)) == pytest.approx(3e-3)
    assert store.is_complete(1)


def test_second_run_does_no_training_and_corruption_recomputes(finished, tmp_path):
    cfg, out, store = finished
    lottery = Lottery(cfg, out)
    lottery.run()
    assert lottery.trained_levels == []
    # a corrupted level file is detected by its checksum and that level (and only it) retrains
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    target = copy / cfg.run_id / "level_002" / "final.msgpack"
    target.write_bytes(target.read_bytes()[:-10])
    lottery = Lottery(cfg, copy)
    assert "does not match its checksum" in lottery.store.level_problem(2)
    lottery.run()
    assert lottery.trained_levels == [2]
    a = load_runs(out).drop(columns="wall_s")
    b = load_runs(copy).drop(columns="wall_s")
    pd.testing.assert_frame_equal(a, b)


def test_same_config_twice_gives_identical_metrics(finished, tmp_path):
    cfg, out, _ = finished
    cfg2 = tiny(prune={"levels": 1})
    run_lottery(cfg2, tmp_path)
    a = load_runs(out)
    b = load_runs(tmp_path)
    cols = ["level", "arm", "seed", "step", "split", "loss", "accuracy", "density"]
    a = a[a.level <= 1][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b[cols].reset_index(drop=True))


@pytest.mark.slow
def test_kill_and_resume_gives_identical_results(finished, tmp_path):
    """SIGKILL the CLI in the middle of a level, rerun the same command, compare with an uninterrupted run."""
    cfg, out, _ = finished
    exp = tmp_path / "tiny.toml"
    exp.write_text(toml_text(TINY))
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "lth.cli", "lottery", str(exp), "--out", str(killed), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = killed / cfg.run_id
    deadline = time.time() + 120
    # wait until level 1 is complete and level 2 has started writing or training, then kill
    while time.time() < deadline and not (run_dir / "level_001" / "COMPLETE").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # at once: with warm compile caches a tiny level takes ~0.1 s
    proc.wait()
    assert (run_dir / "level_001" / "COMPLETE").exists()
    assert not (run_dir / "level_003" / "COMPLETE").exists()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a = load_runs(out).drop(columns="wall_s")
    b = load_runs(killed).drop(columns="wall_s")
    pd.testing.assert_frame_equal(a, b)
    for level in range(4):
        for name in ("masks.msgpack", "final.msgpack"):
            assert (out / cfg.run_id / f"level_{level:03d}" / name).read_bytes() == \
                (run_dir / f"level_{level:03d}" / name).read_bytes()
    assert not list(killed.rglob("*.tmp"))


def test_load_runs_columns_and_errors(finished, tmp_path):
    cfg, out, _ = finished
    df = load_runs(out)
    for col in ["run_id", "experiment", "arm", "seed", "level", "density", "step", "split", "loss", "accuracy",
                "early_stop_step", "train.lr", "prune.rate", "model.widths"]:
        assert col in df.columns, col
    assert set(df["arm"]) == {"ticket", "reinit", "random_prune", "shuffle"}
    assert set(df["split"]) == {"train", "val", "test"}
    assert (df["experiment"] == "tiny").all() and (df["train.lr"] == 3e-3).all()
    with pytest.raises(NotAStoreError, match="not an lth store"):
        load_runs(tmp_path)
    with pytest.raises(NotAStoreError, match="is not a folder"):
        load_runs(tmp_path / "missing")


@pytest.mark.slow
def test_wandb_offline_logs_and_a_wandb_failure_is_not_fatal(tmp_path, monkeypatch):
    cfg = tiny(prune={"levels": 1}, arms=["ticket", "reinit"], log={"wandb": "offline", "progress": False})
    monkeypatch.setenv("WANDB_MODE", "offline")
    store = run_lottery(cfg, tmp_path / "ok")
    runs = sorted(p.name for p in (store.path / "wandb").glob("offline-run-*"))  # <run>/wandb/, not wandb/wandb
    assert len(runs) == 4  # (ticket, reinit) x 2 seeds
    import wandb

    def boom(*a, **k):
        raise RuntimeError("no W&B today")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(RuntimeWarning, match="W&B logging disabled"):
        store = run_lottery(cfg, tmp_path / "broken")
    assert store.is_complete(1)


def test_small_dense_baseline_matches_the_tickets_parameter_count(tmp_path):
    cfg = tiny(arms=["ticket", "small_dense"], model={"widths": [64, 64]},
               prune={"levels": 2, "rate": 0.5, "output_rate": 0.5})
    run_lottery(cfg, tmp_path)
    df = load_runs(tmp_path)
    for level in (1, 2):
        d = df[df.level == level]
        ticket, small = d[d.arm == "ticket"], d[d.arm == "small_dense"]
        assert set(small["seed"]) == {0, 1}
        assert small["density"].unique().tolist() == ticket["density"].unique().tolist()
        target, count = ticket["param_count"].iloc[0], small["param_count"].iloc[0]
        assert abs(count - target) <= 0.02 * target
        assert small["width"].iloc[0] < 1.0
        # the small-dense members really have that many parameters
    final = load_tree(tmp_path / cfg.run_id / "level_002" / "small_dense_final.msgpack")
    n = sum(np.asarray(x)[0].size for x in jax.tree.leaves(final["params"]))
    assert n == df[(df.level == 2) & (df.arm == "small_dense")]["param_count"].iloc[0]
    from analysis import figures
    fig = figures.sparse_vs_dense(df)
    small = df[(df.arm == "small_dense") & (df.split == "test") & (df.step == df.step.max())]
    want = small.groupby("level")["accuracy"].mean().to_numpy() * 100
    got = [ln for ln in fig.axes[0].containers]  # errorbar containers, one per arm
    assert len(got) == 2
    np.testing.assert_allclose(sorted(got[1].lines[0].get_ydata()), sorted(want))


def test_sparsity_cli_reports_exact_counts(finished, capsys):
    from lth.cli import main
    cfg, out, store = finished
    assert main(["sparsity", str(store.path), "--level", "2"]) == 0
    text = capsys.readouterr().out
    init = load_tree(store.path / "init.msgpack")
    counts = expected_counts(unstack(init["params"], 0), cfg.prune, 2)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("dense_0/kernel"))
    assert line.split()[3:5] == ["960", str(counts["dense_0"]["kernel"])]  # count, kept
    assert main(["sparsity", str(store.path), "--level", "9"]) == 2


def test_sensitivity_table_has_one_row_per_layer_and_density(finished, capsys):
    from lth.cli import main
    from lth.config import load_experiment
    from lth.prune.sensitivity import rates_for, sensitivity
    cfg, out, store = finished
    table = sensitivity(store.path, 1, [0.5, 0.2])
    test = table[table.split == "test"]
    assert sorted(zip(test.layer, test.density)) == sorted(
        (layer, d) for layer in ("dense_0", "dense_1", "output") for d in (0.5, 0.2))
    df = load_runs(out)
    base = df[(df.level == 1) & (df.member == 0) & (df.split == "test")].sort_values("step")["accuracy"].iloc[-1]
    assert test["base_accuracy"].unique() == pytest.approx([base])  # same network as the stored ticket
    assert (store.level_dir(1) / "sensitivity.parquet").is_file()
    rates = rates_for(table, tolerance=1.0, levels=3)  # any drop allowed: every layer to the lowest density
    assert rates["dense_0"] == pytest.approx(1 - 0.2 ** (1 / 3), abs=1e-6)
    assert main(["sensitivity", str(store.path), "--level", "1", "--densities", "0.5", "--to-rates", "0.01"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("--set")][0]
    exp = out / "exp.toml"
    exp.write_text("")
    cfg2 = load_experiment(exp, [line.split(" ", 1)[1].strip("'")])
    assert set(cfg2.prune.rates) == {"dense_0", "dense_1", "output"}


def test_every_configurable_arm_is_a_registry_entry_or_small_dense():
    from lth.config import ARMS as CONFIG_ARMS
    from lth.lottery import ARMS
    assert set(ARMS) | {"small_dense"} == set(CONFIG_ARMS)
