"""Experiment config: validation messages, overrides, JSON round trip, stable run ids."""

import dataclasses
from pathlib import Path

import pytest

from lth.config import ConfigError, ExperimentConfig, TrainConfig, apply_overrides, load_experiment

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_every_experiment_file_loads_and_round_trips(path):
    cfg = load_experiment(path)
    assert ExperimentConfig.from_json(cfg.to_json()) == cfg
    text = path.read_text()  # each recipe says what it reproduces, or that it is a new measurement (issue 24)
    assert "reproduces" in text or "Figure" in text or "new measurement" in text


def test_json_round_trip_is_exact_for_non_default_values():
    cfg = ExperimentConfig.from_dict({
        "seeds": [3, 1], "arms": ["ticket", "shuffle"],
        "train": {"lr": 0.1 + 0.2, "milestones": [5, 9], "steps": 77},
        "model": {"widths": [7, 3], "width": 0.37}, "prune": {"exclude": ["output"]}})
    back = ExperimentConfig.from_json(cfg.to_json())
    assert back == cfg and back.train.lr == 0.1 + 0.2 and back.model.widths == (7, 3)


@pytest.mark.parametrize("raw, fragment", [
    ({"train": {"lr": -1}}, "train.lr = -1 is not allowed; expected a number > 0"),
    ({"prune": {"rate": 1.5}}, "prune.rate = 1.5 is not allowed; expected a fraction in [0, 1)"),
    ({"train": {"lrr": 0.1}}, "unknown key train.lrr (did you mean train.lr?)"),
    ({"bogus": 1}, "unknown key bogus"),
    ({"train": {"epochs": "ten"}}, "train.epochs = 'ten' is not allowed; expected an integer"),
    ({"train": {"steps": -5}}, "train.steps = -5 is not allowed; expected an integer in [1, 2147483647]"),
    ({"train": {"optimizer": "rmsprop"}}, "expected one of 'sgd', 'adam'"),
    ({"model": {"name": "lenet5"}}, "model.name = 'lenet5'"),
    ({"arms": ["reinit"]}, "starting with 'ticket'"),
    ({"seeds": [1, 1]}, "distinct integers"),
    ({"data": 5}, "data must be a table"),
])
def test_bad_values_name_key_value_and_allowed(raw, fragment):
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict(raw, "exp.toml")
    assert fragment in str(e.value)
    assert str(e.value).startswith("exp.toml")


def test_overrides_use_toml_values_and_bare_words(tmp_path):
    f = tmp_path / "e.toml"
    f.write_text('seeds = [0]\n[train]\nlr = 0.5\n')
    cfg = load_experiment(f, ["train.lr=1e-3", "train.optimizer=sgd", "seeds=[1,2]", "train.nesterov=true",
                              "model.widths=[10, 20]"])
    assert cfg.train.lr == 1e-3 and cfg.train.optimizer == "sgd" and cfg.seeds == (1, 2)
    assert cfg.train.nesterov is True and cfg.model.widths == (10, 20)
    with pytest.raises(ConfigError, match="--set 'train.lr': expected section.key=value"):
        load_experiment(f, ["train.lr"])
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_experiment(f, ["trian.lr=1"])
    with pytest.raises(ConfigError, match="with --set train.lr=-2: train.lr = -2"):
        load_experiment(f, ["train.lr=-2"])


def test_malformed_toml_and_missing_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[train\nlr = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_experiment(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "nope.toml")


def test_run_id_hashes_result_fields_only_and_is_pinned():
    base = ExperimentConfig()
    # pinned: changing this means old results can no longer be found by id
    assert base.run_id == "44136fa355b3"
    assert ExperimentConfig.from_dict({"name": "other", "log": {"wandb": "disabled"}}).run_id == base.run_id
    assert base.replace(train=TrainConfig(lr=0.5)).run_id != base.run_id
    # setting a field to its default keeps the id, so adding defaulted fields keeps old ids valid
    assert base.replace(train=dataclasses.replace(base.train, lr=1.2e-3)).run_id == base.run_id
    assert apply_overrides({}, ["train.lr=None"]) == {"train": {}}


def test_run_id_leaves_out_levels_seeds_and_arms_and_the_legacy_id_is_pinned():
    raw = {"seeds": [0, 1, 2], "arms": ["ticket", "reinit"], "prune": {"levels": 5, "rate": 0.3},
           "train": {"lr": 3e-3}}
    cfg = ExperimentConfig.from_dict(raw)
    # pinned: the current scheme (a run grows by levels, seeds and arms) and the scheme before it
    assert cfg.run_id == "5323129e845b"
    assert cfg.legacy_run_id == "6fdf1dc7a98b"
    fewer = ExperimentConfig.from_dict({**raw, "seeds": [7], "arms": ["ticket"], "prune": {"levels": 1, "rate": 0.3}})
    assert fewer.run_id == cfg.run_id and fewer.legacy_run_id != cfg.legacy_run_id
    assert ExperimentConfig.from_dict({**raw, "prune": {"levels": 5, "rate": 0.2}}).run_id != cfg.run_id
    assert ExperimentConfig().run_id == ExperimentConfig().legacy_run_id  # defaults: both schemes agree


@pytest.mark.parametrize("text, key", [
    ("[train]\nlr = inf\n", "train.lr"),
    ("[train]\nweight_decay = 1e309\n", "train.weight_decay"),
    ("[train]\ngamma = nan\n", "train.gamma"),
    ("[rewind]\nfinetune_lr = inf\n", "rewind.finetune_lr"),
    ("[prune]\nrates = {dense_0 = nan}\n", "prune.rates"),
])
def test_non_finite_numbers_are_rejected(tmp_path, text, key):
    f = tmp_path / "e.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=f"{key} = .* is not allowed; expected a finite number"):
        load_experiment(f)
    with pytest.raises(ConfigError, match="train.lr = inf is not allowed; expected a finite number"):
        ExperimentConfig.from_json('{"train": {"lr": Infinity}}')
