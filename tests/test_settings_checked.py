"""Settings that were accepted, then ignored or wrong: each is honoured, or refused in one line before
any work (issue 23, items 10-14)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lth
from lth.config import MAX_PATH_POINTS, MAX_STEPS, ConfigError, ExperimentConfig, QuantConfig
from lth.data import MAX_CLASSES, DataError, load_dataset
from lth.lottery.runner import Lottery
from lth.models import MLP
from lth.pipeline import run_experiment
from lth.registry import MODELS
from lth.sweep import expand

from helpers import tiny

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lth.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def one_line_exit_2(r, fragment):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("lth: error: "), r.stderr
    assert fragment in r.stderr, r.stderr


# ---------------------------------------------------------------------------- 23.10

def test_a_granularity_that_prunes_nothing_exits_2_before_training(tmp_path):
    out = tmp_path / "out"
    r = run_cli("lottery", "experiments/quickstart.toml", "--out", str(out), "--no-progress",
                "--set", "log.wandb=disabled", "--set", "prune.granularity=n:m", "--set", "prune.m=7",
                "--set", "prune.n=2")
    one_line_exit_2(r, "prune.granularity = 'n:m' with prune.m = 7 prunes nothing in model.name = 'mlp'")
    assert not list(out.rglob("level_*"))  # nothing trained


# ---------------------------------------------------------------------------- 23.11

def _register(registry, name, fn):
    registry.register(name, fn, replace=True)


def test_the_models_output_width_is_checked_against_the_datas_classes(tmp_path):
    for extra, width in ((3, 13), (-2, 8)):
        name = f"accel_output_{width}"
        _register(MODELS, name, lambda cfg, num_classes, shape, extra=extra: MLP((8,), num_classes + extra))
        cfg = tiny(model={"name": name}, prune={"levels": 1})
        with pytest.raises(ConfigError, match=rf"{name} on mnist1d: the model gives logits of width {width} .* but "
                                              r"the data set has 10 classes"):
            Lottery(cfg, tmp_path)
    assert not list(tmp_path.rglob("hparams.json"))  # refused before any work


def labels_past_classes(cfg):
    rng = np.random.default_rng(0)
    y = np.arange(40) % 5  # labels 0..4
    return rng.normal(size=(40, 3)).astype(np.float32), y, rng.normal(size=(10, 3)).astype(np.float32), y[:10]


labels_past_classes.num_classes = 3


def huge_label(cfg):
    """A loader without num_classes whose largest label would make a 1e9-way output layer."""
    x = np.zeros((20, 3), np.float32)
    y = np.zeros(20, np.int64)
    y[3] = 10**9
    return x, y, x[:5], y[:5]


def test_labels_at_or_past_num_classes_and_a_huge_label_are_refused_when_the_data_loads():
    load_dataset.cache_clear()
    with pytest.raises(DataError, match=r"a label is 4, but the data set has num_classes = 3 \(labels 0..2\)"):
        load_dataset(lth.config.DataConfig(name="test_settings_checked:labels_past_classes", val_size=5))
    with pytest.raises(DataError, match=rf"the largest label is 1000000000, so the model would get 1000000001 "
                                        rf"outputs; lth allows at most {MAX_CLASSES} classes"):
        load_dataset(lth.config.DataConfig(name="test_settings_checked:huge_label", val_size=5))
    load_dataset.cache_clear()


# ---------------------------------------------------------------------------- 23.12

@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    out = tmp_path_factory.mktemp("checked")
    cfg = tiny(prune={"levels": 1}, seeds=[0], arms=["ticket"], train={"steps": 6, "eval_every": 3})
    return run_experiment(cfg, out, progress=False).path


def test_quant_levels_of_lth_quantize_are_honoured(stored):
    from lth.quant import quantize_run
    df = quantize_run(stored, None, [8], ["ptq"], config=QuantConfig(levels=(1,)), write=False)
    assert sorted(set(df.level)) == [1]
    df = quantize_run(stored, None, [8], ["ptq"], config=QuantConfig(levels="last"), write=False)
    assert sorted(set(df.level)) == [1]


@pytest.mark.parametrize("kw, message", [
    ({"points": 0}, f"--points 0: expected an integer in [2, {MAX_PATH_POINTS}]"),
    ({"points": 10**6}, f"--points 1000000: expected an integer in [2, {MAX_PATH_POINTS}]"),
    ({"bn_batches": 0}, "--bn-batches 0: expected an integer >= 1"),
    ({"bn_batches": -5}, "--bn-batches -5: expected an integer >= 1"),
])
def test_lth_stability_refuses_zero_and_negative_points_and_bn_batches(stored, kw, message):
    from lth.lottery.stability import rewind_stability
    with pytest.raises(ConfigError) as e:
        rewind_stability(stored, 1, [0], **kw)
    assert str(e.value).startswith(message)
    assert not (stored / "stability_rewind").exists()


def test_step_counts_past_the_int32_step_counter_are_refused():
    with pytest.raises(ConfigError, match=rf"quant.qat_steps = 100000000000000 is not allowed; expected an integer in "
                                          rf"\[1, {MAX_STEPS}\]"):
        QuantConfig.from_dict({"qat_steps": 10**14})
    with pytest.raises(ConfigError, match=r"train.steps = 2147483648 is not allowed"):
        tiny(train={"steps": 2**31})


# ---------------------------------------------------------------------------- 23.13

def test_a_sweep_axis_over_a_table_valued_key_expands_as_with_set(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('[model]\nname = "mlp"\nwidths = [8]\n[prune]\nlevels = 1\n'
                    '[sweep]\n"prune.rates" = [{dense_0 = 0.3}, {dense_0 = 0.5, output = 0.1}]\n')
    points = expand(path)
    assert [p.cfg.prune.rates for p in points] == [{"dense_0": 0.3}, {"dense_0": 0.5, "output": 0.1}]
    with_set = lth.config.load_experiment(path, ["prune.rates={dense_0 = 0.3}"])
    assert points[0].run_id == with_set.run_id


# ---------------------------------------------------------------------------- 23.14

def test_experiment_set_merges_a_section_table_and_numpy_values_are_numbers():
    exp = lth.Experiment(tiny())
    grown = exp.set(prune={"levels": 2})
    assert grown.config.prune.levels == 2
    assert grown.config.prune.rate == exp.config.prune.rate == 0.3  # the table's other keys are kept
    assert grown.config.prune.output_rate == 0.15
    assert exp.set(prune={"output_rate": None}).config.prune.output_rate is None  # None: the default
    n = exp.set(seeds=np.array([3, 4]), **{"prune.levels": np.int64(1)}, train={"lr": np.float64(0.01)})
    assert n.config.seeds == (3, 4) and n.config.prune.levels == 1 and n.config.train.lr == 0.01
    assert type(n.config.prune.levels) is int
    direct = ExperimentConfig.from_dict({"seeds": np.array([0, 1]), "prune": {"levels": np.int64(2)}})
    assert direct.seeds == (0, 1) and direct.prune.levels == 2
    with pytest.raises(ConfigError, match=r"train.lr = <object .*> is not allowed; expected a number"):
        exp.set(train={"lr": object()})


# ---------------------------------------------------------------------------- 23.15

def test_out_of_range_weight_and_activation_bits_are_named_apart():
    from lth.quant.numerics import QuantSpec
    with pytest.raises(ValueError, match=r"^act_bits = 16 is not supported \(activation bits\); allowed: 8, 4, 3, 2$"):
        QuantSpec(4, act_bits=16)
    with pytest.raises(ValueError, match=r"^act_bits = 1 is not supported \(activation bits\)"):
        QuantSpec(4, act_bits=1)
    with pytest.raises(ValueError, match=r"^bits = 16 is not supported \(weight bits\); allowed: 8, 4, 3, 2, 1$"):
        QuantSpec(16, act_bits=8)
