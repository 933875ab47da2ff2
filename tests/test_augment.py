"""Training-batch augmentation (data.augment = crop_flip) and quick subsets (data.train_size).

crop_flip runs on the device inside the compiled step, keyed by (the member's data seed, step): these
tests pin what it does to a batch, that it is deterministic, that a population equals its members
run alone, that a resumed run is bitwise the uninterrupted one, and that evaluation is never
augmented. Data are tiny synthetic images; no CIFAR files are needed.
"""

import json
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from lth.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from lth.data import CROP_PAD, DataError, augment_key, crop_flip, load_dataset
from lth.models import build_model, loop_friendly_conv
from lth.train import Engine, stack, unstack


# ---------------------------------------------------------------------------- the function

jit_crop_flip = jax.jit(crop_flip, static_argnames="pad")  # one compile instead of one per primitive

def shifted(img: np.ndarray, dy: int, dx: int, pad: int) -> np.ndarray:
    """``img [H, W, C]`` cropped at offset (dy, dx) from its zero-padded copy, written out in numpy."""
    h, w, _ = img.shape
    out = np.zeros_like(img)
    for r in range(h):
        for c in range(w):
            sr, sc = r + dy - pad, c + dx - pad
            if 0 <= sr < h and 0 <= sc < w:
                out[r, c] = img[sr, sc]
    return out


def test_crop_flip_gives_a_zero_filled_shifted_copy_maybe_mirrored_per_example():
    rng = np.random.default_rng(0)
    x = rng.uniform(1, 2, (64, 6, 7, 2)).astype(np.float32)  # no zeros: every 0 comes from the padding
    out = np.asarray(jit_crop_flip(jax.random.key(3), jnp.asarray(x), pad=2))
    assert out.shape == x.shape
    seen = set()
    for img, aug in zip(x, out):
        hits = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                if np.array_equal(aug, shifted(img, dy, dx, 2)[:, ::-1] if f else shifted(img, dy, dx, 2))]
        assert len(hits) == 1, "each output is exactly one shift (and maybe mirror) of its own input"
        seen.add(hits[0])
    # offsets and flips are drawn per example: many distinct ones in a batch of 64, both flip states
    assert len(seen) > 20 and {f for _, _, f in seen} == {False, True}
    assert any(dy != 2 or dx != 2 for dy, dx, _ in seen)


def test_flip_alone_reverses_the_width_axis():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(32, 4, 5, 3)).astype(np.float32))
    out = np.asarray(jit_crop_flip(jax.random.key(0), x, pad=0))  # no padding: the crop is the image
    flipped = [np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, x)]
    kept = [np.array_equal(o, np.asarray(i)) for o, i in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))  # each example is one or the other
    assert 0 < sum(flipped) < len(x)


def test_different_steps_and_seeds_give_different_augmentations_and_the_same_key_the_same():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(16, 8, 8, 3)).astype(np.float32))

    @jax.jit
    def aug(seed, step):
        return crop_flip(augment_key(jax.random.key(seed), step), x)

    np.testing.assert_array_equal(aug(0, 5), aug(0, 5))
    assert not np.array_equal(aug(0, 5), aug(0, 6))
    assert not np.array_equal(aug(0, 5), aug(1, 5))
    assert CROP_PAD == 4


# ---------------------------------------------------------------------------- in the engine

class TinyConv(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv_0", conv_general_dilated=loop_friendly_conv)(x))
        return nn.Dense(3, name="output")(x.reshape((x.shape[0], -1)))


def images(n=64, seed=0, hw=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + 40, hw, hw, 3)).astype(np.float32)
    y = (x[..., 0].mean((1, 2)) > 0).astype(np.int32) + (x[:, : hw // 2].mean((1, 2, 3)) > 0)
    return SimpleNamespace(x_train=x[:n], y_train=y[:n], x_val=x[n:n + 20], y_val=y[n:n + 20],
                           x_test=x[n + 20:], y_test=y[n + 20:], num_classes=3, input_shape=(hw, hw, 3))


def population(engine, seeds):
    model, data = engine.model, engine.data
    params = [model.init(jax.random.key(s), jnp.zeros((1, *data.input_shape)))["params"] for s in seeds]
    masks = [jax.tree.map(lambda p: np.ones(p.shape, bool), p) for p in params]
    rngs = jax.vmap(jax.random.wrap_key_data)(jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds]))
    return engine.init(stack(params), {}, stack(masks), rngs)


def engine(segment="scan", augment="crop_flip", **kw):
    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=8, steps=12, eval_every=4,
                      segment=segment, **kw)
    return Engine(TinyConv(), images(), cfg, augment=augment)


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]


def test_crop_flip_is_deterministic_changes_training_and_never_touches_evaluation():
    runs = [engine().run(population(engine(), [0]), [5]) for _ in range(2)]
    assert runs[0].records == runs[1].records
    for a, b in zip(leaves(runs[0].state), leaves(runs[1].state)):
        np.testing.assert_array_equal(a, b)
    plain = engine(augment="none")
    other = plain.run(population(plain, [0]), [5])
    assert not np.allclose(leaves(other.state)[0], leaves(runs[0].state)[0])  # augmentation was applied
    # the data seed keys it: another data seed, same init, trains differently
    reseeded = engine().run(population(engine(), [0]), [6])
    assert not np.allclose(leaves(reseeded.state)[0], leaves(runs[0].state)[0])
    # evaluation of one state is the same with and without augmentation
    state = runs[0].state
    for split, (loss, acc) in engine().evaluate(state).items():
        ref_loss, ref_acc = plain.evaluate(state)[split]
        np.testing.assert_array_equal(loss, ref_loss)
        np.testing.assert_array_equal(acc, ref_acc)


@pytest.mark.parametrize("segment", ["scan", "step"])
def test_population_with_crop_flip_equals_its_members_run_alone(segment):
    eng = engine(segment)
    seeds = [0, 1, 2]
    together = eng.run(population(eng, seeds), [10, 11, 12])
    for k, s in enumerate(seeds):
        alone = eng.run(population(eng, [s]), [10 + k])
        for a, b in zip(jax.tree.leaves(unstack(together.state.params, k)), jax.tree.leaves(unstack(alone.state.params, 0))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([r["loss"] for r in together.records if r["member"] == k],
                                   [r["loss"] for r in alone.records], rtol=1e-5)


def test_shared_data_order_shares_the_augmentation_too():
    eng = engine(shared_data_order=True)
    out = eng.run(population(eng, [0, 0]), [3, 4])  # same init, one order: identical members
    for a, b in zip(jax.tree.leaves(unstack(out.state.params, 0)), jax.tree.leaves(unstack(out.state.params, 1))):
        np.testing.assert_array_equal(a, b)


def test_resume_with_crop_flip_is_bitwise_the_uninterrupted_run_in_either_segment_strategy():
    full = engine().run(population(engine(), [0, 1]), [0, 1], snapshot_steps=[3])
    first = engine("step").run(population(engine("step"), [0, 1]), [0, 1], stop=5)  # stops mid-epoch, off an eval
    rest = engine().run(first.state, [0, 1], start=5)
    assert int(rest.state.step[0]) == 12
    for a, b in zip(leaves(full.state), leaves(rest.state)):
        np.testing.assert_array_equal(a, b)
    assert [r for r in full.records if r["step"] > 8] == [r for r in rest.records if r["step"] > 8]


def test_crop_flip_on_flat_inputs_is_a_clear_error():
    flat = SimpleNamespace(x_train=np.zeros((10, 4), np.float32), y_train=np.zeros(10, np.int32),
                           x_val=np.zeros((0, 4), np.float32), y_val=np.zeros(0, np.int32),
                           x_test=np.zeros((2, 4), np.float32), y_test=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"'crop_flip' needs images \[N, H, W, C\]"):
        Engine(nn.Dense(3), flat, TrainConfig(batch_size=2, steps=1), augment="crop_flip")
    with pytest.raises(ConfigError, match="data.augment = 'crop_flip' is not allowed with data.name = 'mnist1d'"):
        ExperimentConfig.from_dict({"data": {"name": "mnist1d", "augment": "crop_flip"}})
    with pytest.raises(ConfigError, match="data.augment = 'flip' is not allowed; expected one of 'none', 'crop_flip'"):
        ExperimentConfig.from_dict({"data": {"name": "cifar10", "augment": "flip"}})


# ---------------------------------------------------------------------------- config and data

def test_augment_and_train_size_are_part_of_the_run_id_and_their_defaults_are_not():
    base = ExperimentConfig.from_dict({"data": {"name": "fashion_mnist"}})
    same = ExperimentConfig.from_dict({"data": {"name": "fashion_mnist", "augment": "none", "train_size": 0}})
    assert same.run_id == base.run_id
    ids = {base.run_id,
           ExperimentConfig.from_dict({"data": {"name": "fashion_mnist", "augment": "crop_flip"}}).run_id,
           ExperimentConfig.from_dict({"data": {"name": "fashion_mnist", "train_size": 1000}}).run_id}
    assert len(ids) == 3
    with pytest.raises(ConfigError, match=r"data.train_size = -1 is not allowed; expected an integer >= 0"):
        ExperimentConfig.from_dict({"data": {"train_size": -1}})


@pytest.fixture
def idx_root(tmp_path, monkeypatch):
    """A tiny MNIST-format set (60 train, 10 test images of 8x8) under a fresh $LTH_DATA_DIR."""
    from test_data import tiny_idx_set
    monkeypatch.setenv("LTH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LTH_CACHE_DIR", str(tmp_path / "cache"))
    load_dataset.cache_clear()
    tiny_idx_set(tmp_path / "data" / "mnist", n_train=60, n_test=10, hw=(8, 8))
    yield tmp_path
    load_dataset.cache_clear()


def first_pixels(x):
    """Pixel [0, 0] of image i held i before scaling (test_data.tiny_idx_set): the source rows."""
    return sorted(np.rint(x[:, 0, 0, 0] * 255).astype(int).tolist())


def test_train_size_is_a_seeded_subset_of_the_train_split_disjoint_from_val(idx_root):
    cfg = DataConfig(name="mnist", val_size=10, normalize=False)
    full = load_dataset(cfg)
    sub = load_dataset(DataConfig(name="mnist", val_size=10, normalize=False, train_size=20))
    again = load_dataset(DataConfig(name="mnist", val_size=10, normalize=False, train_size=20, split_seed=0))
    other = load_dataset(DataConfig(name="mnist", val_size=10, normalize=False, train_size=20, split_seed=1))
    assert len(sub.x_train) == 20 and sub.fingerprint["train"] == 20
    assert set(first_pixels(sub.x_train)) < set(first_pixels(full.x_train))  # a subset of the train split
    np.testing.assert_array_equal(sub.x_val, full.x_val)  # the val split does not depend on train_size
    np.testing.assert_array_equal(sub.x_train, again.x_train)  # deterministic
    assert first_pixels(other.x_train) != first_pixels(sub.x_train)  # seeded by split_seed
    assert sub.fingerprint["sha256"] != full.fingerprint["sha256"]
    # the whole split asked for explicitly is the same data as 0 (= all): same arrays and fingerprint
    whole = load_dataset(DataConfig(name="mnist", val_size=10, normalize=False, train_size=50))
    assert whole.fingerprint == full.fingerprint


def test_train_size_larger_than_the_split_is_an_error_naming_both_sizes(idx_root):
    with pytest.raises(DataError, match=r"train_size = 51 is larger than the train split \(50 examples: 60 "
                                        r"minus val_size = 10\)"):
        load_dataset(DataConfig(name="mnist", val_size=10, train_size=51))


def test_augmented_data_set_shares_arrays_and_fingerprint_and_flat_data_refuses(idx_root):
    plain = load_dataset(DataConfig(name="mnist", val_size=10))
    aug = load_dataset(DataConfig(name="mnist", val_size=10, augment="crop_flip"))
    assert aug.augment == "crop_flip" and plain.augment == "none"
    assert aug.x_train is plain.x_train and aug.fingerprint == plain.fingerprint
    flat = plain.__class__("flat", x_train=np.zeros((4, 3), np.float32),
                           y_train=np.zeros(4, np.int32), x_val=np.zeros((0, 3), np.float32),
                           y_val=np.zeros(0, np.int32), x_test=np.zeros((2, 3), np.float32),
                           y_test=np.zeros(2, np.int32), num_classes=2)
    with pytest.raises(DataError, match=r"data.augment = 'crop_flip' needs image data \[N, H, W, C\]; data set "
                                        r"'flat' gives inputs of shape \(3,\)"):
        flat.with_augment("crop_flip")


@pytest.mark.slow
def test_lottery_trains_conv2_with_crop_flip_on_a_train_subset(idx_root):
    """The setting reaches the engine through the runner: the run records the subset's size and
    trains differently from the same run without augmentation."""
    from lth.lottery import run_lottery
    raw = {"data": {"name": "mnist", "val_size": 10, "train_size": 40, "augment": "crop_flip"},
           "model": {"name": "conv2", "width": 0.0625}, "seeds": [0],
           "train": {"batch_size": 10, "steps": 6, "eval_every": 3}, "prune": {"levels": 1},
           "log": {"wandb": "disabled", "progress": False}}
    store = run_lottery(ExperimentConfig.from_dict(raw), idx_root / "runs")
    hp = json.loads((store.path / "hparams.json").read_text())
    assert hp["data"]["augment"] == "crop_flip" and hp["data_fingerprint"]["train"] == 40
    raw["data"]["augment"] = "none"
    plain = run_lottery(ExperimentConfig.from_dict(raw), idx_root / "runs")
    assert plain.run_id != store.run_id
    a, b = (pd.read_parquet(s.path / "level_000" / "metrics.parquet") for s in (store, plain))
    assert len(a) == len(b) and not np.allclose(a["loss"], b["loss"])


# ---------------------------------------------------------------------------- any image shape

@pytest.mark.parametrize("name, width", [("conv2", 0.25), ("conv4", 0.125), ("conv6", 0.125),
                                         pytest.param("vgg11", 0.0625, marks=pytest.mark.slow),
                                         pytest.param("resnet20", 0.25, marks=pytest.mark.slow)])
def test_conv_nets_build_and_train_on_28x28x1_images(name, width):
    model = build_model(ModelConfig(name=name, width=width), 10, (28, 28, 1))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(72, 28, 28, 1)).astype(np.float32)
    y = (x[:, :14].mean((1, 2, 3)) > x[:, 14:].mean((1, 2, 3))).astype(np.int32)  # top vs bottom half
    data = SimpleNamespace(x_train=x[:64], y_train=y[:64], x_val=x[:0], y_val=y[:0], x_test=x[64:],
                           y_test=y[64:], num_classes=10, input_shape=(28, 28, 1))
    steps = 30 if name == "conv2" else 1  # the others: the step compiles and runs on this shape
    eng = Engine(model, data, TrainConfig(optimizer="adam", lr=2e-3, batch_size=16, steps=steps, eval_every=steps),
                 augment="crop_flip")
    v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    masks = jax.tree.map(lambda p: np.ones(p.shape, bool), v["params"])
    state = eng.init(stack([v["params"]]), stack([v.get("batch_stats", {})]), stack([masks]),
                     jax.random.key(0)[None])
    out = eng.run(state, [0], evaluate=name == "conv2")
    train = [r for r in out.records if r["split"] == "train"]
    assert np.isfinite(train[-1]["loss"])
    if name == "conv2":  # the easy task is learned: mean train loss over 30 steps well below chance's ln 10
        assert train[-1]["loss"] < 0.6 * np.log(10)


# ---------------------------------------------------------------------------- the CIFAR recipes

@pytest.mark.parametrize("name, model", [("resnet20_rewind", "resnet20"), ("vgg16_rewind", "vgg16")])
def test_cifar_recipes_follow_the_paper_and_pass_the_runners_checks_without_the_data(name, model):
    """Frankle et al. 2020, Table 1: SGD 0.1, momentum 0.9, batch 128, 63k steps, x0.1 at 32k and 48k,
    weight decay 1e-4, no warmup; with crop_flip. The checks the runner makes against the built model
    (layer names, rewind step within training) pass on CIFAR's 32x32x3 shape."""
    from pathlib import Path

    from lth.config import check_against_model, load_experiment
    from lth.prune.masks import layer_table
    from lth.train import total_steps

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.toml"
    cfg = load_experiment(path)
    t = cfg.train
    assert (cfg.data.name, cfg.data.augment, cfg.model.name) == ("cifar10", "crop_flip", model)
    assert (t.optimizer, t.lr, t.momentum, t.batch_size, t.steps, t.schedule, t.milestones, t.gamma,
            t.weight_decay, t.warmup_steps) == ("sgd", 0.1, 0.9, 128, 63000, "step", (32000, 48000), 0.1, 1e-4, 0)
    assert cfg.rewind.step > 0 and f"iteration {cfg.rewind.step}" in path.read_text()
    shapes = jax.eval_shape(lambda k: build_model(cfg.model, 10, (32, 32, 3)).init(k, jnp.zeros((1, 32, 32, 3))),
                            jax.random.key(0))["params"]
    check_against_model(cfg, layer_table(shapes), total_steps(t, 50_000))


def test_a_stability_copy_gets_its_own_augmentation_key():
    """A copy's data seed is seed + copy * 2**32; jax.random.key alone would drop the high bits."""
    from lth.lottery.runner import Member, data_seed
    from lth.train import data_key_data
    s0, s1 = data_seed(Member("ticket", 5)), data_seed(Member("ticket", 5, 1))
    assert s1 != s0 and not np.array_equal(data_key_data(s1), data_key_data(s0))
    assert np.array_equal(data_key_data(s0), np.asarray(jax.random.key_data(jax.random.key(5))))  # seeds < 2**32 as before
