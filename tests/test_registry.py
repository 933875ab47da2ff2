"""Open registries: models, data sets and criteria from user code by import path or entry point;
structure declared by a user model; the example in examples/custom_model run through the CLI."""

import re
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth import registry
from lth.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, PruneConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_model"

USER_CODE = '''
import flax.linen as nn
import numpy as np

from lth.models import Structure


class Net(nn.Module):
    num_classes: int
    chain: bool = True

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(6, name="hidden")(x.reshape((x.shape[0], -1))))
        return nn.Dense(self.num_classes, name="output")(x)

    def structure(self):
        if not self.chain:
            return Structure()
        return Structure(chain=({"op": "flatten"}, {"op": "dense", "layer": "hidden", "relu": True},
                                {"op": "dense", "layer": "output", "relu": False}))


def build(cfg, num_classes, input_shape):
    return Net(num_classes)


def build_plain(cfg, num_classes, input_shape):
    return Net(num_classes, chain=False)


def blobs(cfg):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 5)) * 4
    y = rng.integers(0, 3, 260)
    x = (centers[y] + rng.normal(size=(260, 5))).astype(np.float32)
    return x[:200], y[:200], x[200:], y[200:]


blobs.val_size = 20


def largest_first(params, signals):
    return {k: {n: -abs(np.asarray(v)) for n, v in layer.items()} for k, layer in params.items()}


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module ``usercode_<n>`` with a model, a loader and a criterion, importable from tmp_path."""
    name = f"usercode_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_import_paths_resolve_and_the_run_id_includes_them(user_module):
    cfg = ExperimentConfig.from_dict({"model": {"name": f"{user_module}:build"},
                                      "prune": {"criterion": f"{user_module}:largest_first"}})
    assert cfg.result_dict()["model"]["name"] == f"{user_module}:build"
    other = ExperimentConfig.from_dict({"model": {"name": f"{user_module}:build_plain"},
                                        "prune": {"criterion": f"{user_module}:largest_first"}})
    assert other.run_id != cfg.run_id
    from lth.models import build_model
    model = build_model(cfg.model, 3, (5,))
    assert type(model).__name__ == "Net"
    # the criterion: prune.criterion by import path reaches criteria.scores
    from lth.prune.criteria import Signals, scores
    params = {"hidden": {"kernel": np.array([[1.0, -3.0]])}}
    sig = Signals(model, params, {}, 0, 1, cfg.prune, lambda: [])
    np.testing.assert_array_equal(scores(params, sig)["hidden"]["kernel"], [[-1.0, -3.0]])


@pytest.mark.parametrize("value, message", [
    ("no_such_pkg.nets:build", r"module 'no_such_pkg.nets' does not import \(ModuleNotFoundError"),
    ("{mod}:missing", r"module '{mod}' has no attribute 'missing'; registered models: mlp, "),
    ("{mod}:NOT_CALLABLE", r"is a int, not a function or class"),
])
def test_import_paths_are_imported_when_work_starts_and_their_problems_are_one_line(user_module, value, message):
    from lth.models import build_model
    value, message = value.format(mod=user_module), message.format(mod=user_module)
    cfg = ExperimentConfig.from_dict({"model": {"name": value}}, "exp.toml")  # checking imports nothing
    with pytest.raises(ValueError, match=f"model '{value}'.*{message}") as e:
        build_model(cfg.model, 3, (5,))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key, value, message", [
    ("data.name", "{mod}:", r"expected an import path 'package.module:callable'"),
    ("prune.criterion", "magnitud", r"unknown criterion 'magnitud'; registered: magnitude, random, saliency, snip, grasp, synflow, obd"),
])
def test_bad_names_are_one_line_config_errors(user_module, key, value, message):
    value, message = value.format(mod=user_module), message.format(mod=user_module)
    section, field = key.split(".")
    with pytest.raises(ConfigError, match=f"exp.toml: {key} = '{value}': .*{message}") as e:
        ExperimentConfig.from_dict({section: {field: value}}, "exp.toml")
    assert "\n" not in str(e.value)


def test_a_module_that_fails_to_import_is_named_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_user_mod.py").write_text("import math\nraise RuntimeError('bad weights file\\nmore')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from lth.models import build_model
    cfg = ModelConfig(name="broken_user_mod:build")  # not imported yet
    with pytest.raises(ValueError, match=r"module 'broken_user_mod' does not import \(RuntimeError: bad weights "
                                         r"file\); registered models") as e:
        build_model(cfg, 3, (5,))
    assert "\n" not in str(e.value)


def test_cli_exits_2_with_the_registry_error(tmp_path):
    exp = tmp_path / "exp.toml"
    exp.write_text('[model]\nname = "nowhere_pkg:build"\n')
    r = subprocess.run([sys.executable, "-m", "lth", "lottery", str(exp), "--out", str(tmp_path / "runs")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "model 'nowhere_pkg:build': module 'nowhere_pkg' does not import" in r.stderr
    assert "Traceback" not in r.stderr


def test_user_model_structure_decides_what_structured_pruning_may_do(user_module):
    from lth.models import build_model
    from lth.prune.structured import check_granularity, is_structured, structured_prune, chain_order
    chain = build_model(ModelConfig(name=f"{user_module}:build"), 3, (5,))
    plain = build_model(ModelConfig(name=f"{user_module}:build_plain"), 3, (5,))
    params = jax.tree.map(np.asarray, chain.init(jax.random.key(0), jnp.zeros((1, 5)))["params"])
    ones = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    mask = structured_prune(params, ones, PruneConfig(granularity="neuron", rate=0.5), chain)
    assert is_structured(mask, chain_order(chain.structure(), params))
    assert mask["hidden"]["kernel"].any(0).sum() == 3 and mask["output"]["kernel"].any(1).sum() == 3
    with pytest.raises(ConfigError, match=f"prune.granularity = 'neuron' is not allowed with model.name = "
                                          f"'{user_module}:build_plain' \\(it declares no plain chain of layers"):
        check_granularity(PruneConfig(granularity="neuron"), plain, params, f"{user_module}:build_plain")
    check_granularity(PruneConfig(granularity="n:m"), plain, params, "plain")  # any model
    from lth.quant import layer_program
    with pytest.raises(ValueError, match="Net declares no plain chain of layers"):
        layer_program(plain)


def _dist_info(site: Path, module: str, dataset: str) -> None:
    """An installed distribution (as pip leaves it) whose entry point registers ``dataset``."""
    info = site / "lth_test_blobs-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lth-test-blobs\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[lth.datasets]\n{dataset} = {module}:blobs\n")
    (info / "RECORD").write_text("")


def test_a_data_set_from_an_installed_entry_point_is_found_by_name_and_trained_on(tmp_path, monkeypatch, user_module):
    from lth.data import load_dataset
    from lth.lottery import run_lottery
    from helpers import tiny
    site = tmp_path / "site"
    _dist_info(site, user_module, "test_blobs")
    with pytest.raises(ConfigError, match="unknown data set 'test_blobs'"):
        DataConfig(name="test_blobs")  # not installed yet
    monkeypatch.syspath_prepend(str(site))
    try:
        assert "test_blobs" in registry.DATASETS.names()
        from lth.config import describe_fields
        assert re.search(r"registered: mnist1d, fashion_mnist, mnist, cifar10(, \w+)*, test_blobs", describe_fields())  # lth settings
        data = load_dataset(DataConfig(name="test_blobs"))
        assert data.num_classes == 3 and data.input_shape == (5,)
        assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (180, 20, 60)  # loader.val_size = 20
        cfg = tiny(seeds=[0], arms=["ticket"], data={"name": "test_blobs", "val_size": None, "mnist1d_samples": 1000},
                   train={"steps": 20, "eval_every": 20, "batch_size": 20}, prune={"levels": 0})
        store = run_lottery(cfg, tmp_path / "runs")
        hp = json.loads((store.path / "hparams.json").read_text())
        assert hp["data"]["name"] == "test_blobs" and hp["data_fingerprint"]["train"] == 180
        import pandas as pd
        m = pd.read_parquet(store.level_dir(0) / "metrics.parquet")
        assert m[m.split == "test"].accuracy.iloc[-1] > 0.5  # three separable blobs: learned, not chance
    finally:
        registry.DATASETS.entries.pop("test_blobs", None)
        load_dataset.cache_clear()


@pytest.mark.slow
def test_the_custom_model_example_runs_lottery_quant_compact_and_report_from_its_toml(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(EXAMPLE)]), "LTH_CACHE_DIR": str(tmp_path / "c")}
    out, figs = tmp_path / "runs", tmp_path / "figs"

    def lth(*args):
        r = subprocess.run([sys.executable, "-m", "lth", *args], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    lth("lottery", str(EXAMPLE / "experiment.toml"), "--out", str(out), "--no-progress")
    (run,) = [p for p in out.iterdir() if (p / "hparams.json").exists()]
    assert json.loads((run / "hparams.json").read_text())["model"]["name"] == "tinynet:build"
    compact = lth("compact", str(run), "--level", "2", "--batch", "50", "--code", "tinynet:build")  # trusted here
    info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in compact.splitlines())}
    assert float(info["max_abs_diff"]) < 1e-4 and int(info["params_compact"]) < int(info["params_masked"])
    env["PYTHONPATH"] = str(ROOT)  # reading a store needs no model code
    lth("report", str(out), "--out", str(figs))
    assert (figs / "accuracy_vs_density.png").exists() and (figs / "accuracy_vs_size.png").exists()
    from analysis import load_runs
    df = load_runs(out)
    assert sorted(df[df.method == "float"].level.unique()) == [0, 1, 2]
    assert set(df[df.method == "float"].arm) == {"ticket", "reinit", "small_dense"}
    q = df[df.method == "ptq"]
    assert set(q.bits) == {8, 4} and set(q.level) == {0, 1, 2}


def test_output_and_frozen_layers_are_what_the_model_declares():
    from jax.tree_util import DictKey

    from lth.models import Structure, layer_kind
    from lth.prune.masks import layer_rates, prunable
    st = Structure(chain=({"op": "dense", "layer": "fc1", "relu": True}, {"op": "dense", "layer": "head", "relu": False}),
                   output=("head",), frozen=("embed",))
    params = {"embed": {"embedding": np.ones((7, 4))}, "fc1": {"kernel": np.ones((4, 5)), "bias": np.ones(5)},
              "head": {"kernel": np.ones((5, 3)), "bias": np.ones(3)}}
    pc = PruneConfig(rate=0.2, output_rate=0.05)
    rates = layer_rates(params, pc, st)
    assert (rates["fc1"]["kernel"], rates["head"]["kernel"], rates["embed"]["embedding"]) == (0.2, 0.05, 0.0)
    can = prunable(params, pc, st)
    assert not can["embed"]["embedding"] and can["head"]["kernel"] and not can["head"]["bias"]
    with pytest.raises(ValueError, match="cannot classify parameter 'embed/embedding'.*Structure.frozen"):
        layer_rates(params, pc)  # undeclared, the embedding is neither kernel, bias nor norm
    # a declared chain layer keeps its kind on population-stacked [K, in, out] trees (rank would say conv)
    path = (DictKey("fc1"), DictKey("kernel"))
    assert layer_kind(path, np.zeros((4, 4, 5))) == "conv" and layer_kind(path, np.zeros((4, 4, 5)), st) == "dense"
    # a layer named output that the model does not declare as its output is an ordinary layer
    assert layer_kind((DictKey("output"), DictKey("kernel")), np.zeros((4, 5)), st) == "dense"
