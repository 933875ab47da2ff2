"""Sweeps: grid expansion, population groups, skipping finished runs, Ray == local, two processes on one store."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import load_runs
from lth.config import ConfigError
from lth.sweep import expand, groups_of, run_sweep, wandb_sweep_config

ROOT = Path(__file__).resolve().parents[1]

SWEEP = """
name = "tiny_sweep"
seeds = [0]
arms = ["ticket", "random_prune"]
[data]
name = "mnist1d"
mnist1d_samples = 1000
val_size = 100
[model]
widths = [16, 8]
[train]
lr = 0.003
batch_size = 50
steps = 30
eval_every = 15
[prune]
levels = 1
rate = 0.3
[log]
wandb = "disabled"
progress = false
[sweep]
"prune.rate" = [0.3, 0.6]
rewind = {step = [0, 10]}
"""


@pytest.fixture
def sweep_file(tmp_path):
    f = tmp_path / "sweep.toml"
    f.write_text(SWEEP)
    return f


def test_grid_is_the_cartesian_product_and_validated(sweep_file, tmp_path):
    points = expand(sweep_file)
    assert [p.overrides for p in points] == [
        ("prune.rate=0.3", "rewind.step=0"), ("prune.rate=0.3", "rewind.step=10"),
        ("prune.rate=0.6", "rewind.step=0"), ("prune.rate=0.6", "rewind.step=10")]
    assert [(p.cfg.prune.rate, p.cfg.rewind.step) for p in points] == [(0.3, 0), (0.3, 10), (0.6, 0), (0.6, 10)]
    assert len({p.run_id for p in points}) == 4
    bad = tmp_path / "bad.toml"
    bad.write_text(SWEEP.replace("[0.3, 0.6]", "[0.3, 1.6]"))
    with pytest.raises(ConfigError, match=r"sweep point prune.rate=1.6 .*prune.rate = 1.6 is not allowed"):
        expand(bad)
    bad.write_text(SWEEP.replace("[0.3, 0.6]", "0.3"))
    with pytest.raises(ConfigError, match="expected a non-empty list"):
        expand(bad)


def test_wandb_sweep_config(sweep_file):
    cfg = wandb_sweep_config(sweep_file, expand(sweep_file), "runs")
    assert cfg["program"] == "lth" and cfg["method"] == "grid"
    assert cfg["parameters"] == {"prune.rate": {"values": [0.3, 0.6]}, "rewind.step": {"values": [0, 10]}}
    assert "${args_no_hyphens}" in cfg["command"]
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg


@pytest.mark.slow
def test_local_sweep_skips_finished_runs_and_ray_gives_the_same_dataframe(sweep_file, tmp_path):
    points = expand(sweep_file)[:2]
    local = run_sweep(points, tmp_path / "local")
    assert [o.status for o in local] == ["trained", "trained"]
    assert [o.status for o in run_sweep(points, tmp_path / "local")] == ["complete", "complete"]
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_sweep(points, tmp_path / "ray", executor="ray")
    finally:
        ray.shutdown()
    assert [o.status for o in remote] == ["trained", "trained"], [o.message for o in remote]
    cols = ["run_id", "level", "arm", "seed", "density", "step", "split", "loss", "accuracy", "early_stop_step"]
    a = load_runs(tmp_path / "local")[cols]
    b = load_runs(tmp_path / "ray")[cols]
    # 2 runs x (level 0: 1 member + level 1: 2 members) x 2 evaluations x 3 splits
    assert len(a) == 2 * (1 + 2) * 2 * 3
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow
def test_two_sweep_processes_on_one_store_run_each_run_once(sweep_file, tmp_path):
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "lth.cli", "sweep", str(sweep_file), "--out", str(out), "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    trained: list[str] = []
    for stdout, _ in outputs:
        for line in stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1] == "trained":
                trained.append(parts[0])
    points = expand(sweep_file)
    # every run trained by exactly one of the two processes (the other saw it busy or complete)
    assert sorted(trained) == sorted(p.run_id for p in points)
    df = load_runs(out)
    assert df["run_id"].nunique() == 4 and set(df["level"]) == {0, 1}
    assert not list(out.rglob("*.tmp"))


def test_runs_sharing_an_architecture_train_as_one_population(sweep_file, tmp_path):
    points = expand(sweep_file)  # (rate, rewind step): (0.3, 0), (0.3, 10), (0.6, 0), (0.6, 10)
    # runs that differ only in how they prune share a population; a different rewind step does not
    assert groups_of(points) == [[0, 2], [1, 3]]
    assert groups_of(points, 1) == [[0], [1], [2], [3]]
    with pytest.raises(ConfigError, match="--group 0 is not allowed"):
        groups_of(points, 0)
    pair = [points[0], points[2]]
    grouped = run_sweep(pair, tmp_path / "grouped")
    alone = run_sweep(pair, tmp_path / "alone", group=1)
    assert [o.status for o in grouped] == [o.status for o in alone] == ["trained", "trained"]
    assert [o.message for o in grouped] == ["", ""]  # not retried alone after a failed group
    # one population: both runs report the group's wall time; alone, each its own
    assert grouped[0].wall_s == grouped[1].wall_s
    assert alone[0].wall_s != alone[1].wall_s
    key = ["run_id", "level", "arm", "seed", "member", "density", "step", "split"]
    a = load_runs(tmp_path / "grouped").sort_values(key).reset_index(drop=True)
    b = load_runs(tmp_path / "alone").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key], b[key])  # same runs, members, densities and evaluations
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a["accuracy"], b["accuracy"], atol=0.011)  # one example in 100 may flip
    # the dense level is trained once per seed and stored in both runs: the same numbers exactly
    dense = a[a.level == 0]
    r0, r1 = (dense[dense.run_id == p.run_id][["step", "split", "loss", "accuracy"]].reset_index(drop=True)
              for p in pair)
    pd.testing.assert_frame_equal(r0, r1)
    assert [o.status for o in run_sweep(pair, tmp_path / "grouped")] == ["complete", "complete"]
