"""The training engine: masks stay exact, population == separate runs, determinism, schedules."""

import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.config import TrainConfig
from lth.models import loop_friendly_conv
from lth.train import DataOrder, Engine, early_stop_steps, make_schedule, segment_strategy, stack, unstack


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16, name="dense_0")(x))
        return nn.Dense(3, name="output")(x)


def tiny_data(n=240, d=8, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, 3))
    x = rng.normal(size=(n + 80, d)).astype(np.float32)
    y = np.argmax(x @ w, 1).astype(np.int32)
    return SimpleNamespace(x_train=x[:n], y_train=y[:n], x_val=x[n:n + 40], y_val=y[n:n + 40],
                           x_test=x[n + 40:], y_test=y[n + 40:], num_classes=3, input_shape=(d,))


def population(engine, seeds, density=0.5):
    model, data = engine.model, engine.data
    params = [model.init(jax.random.key(s), jnp.zeros((1, *data.input_shape)))["params"] for s in seeds]
    rng = np.random.default_rng(123)
    masks = [jax.tree.map(lambda p: rng.random(p.shape) < density, p) for p in params]
    rngs = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
    return engine.init(stack(params), {}, stack(masks), jax.vmap(jax.random.wrap_key_data)(rngs)), masks


@pytest.mark.parametrize("opt", [
    dict(optimizer="adam", lr=1e-2),
    dict(optimizer="sgd", lr=0.1, momentum=0.9),
    dict(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(optimizer="adam", lr=1e-2, weight_decay=1e-2, schedule="cosine", warmup_steps=10),
    dict(optimizer="adamw", lr=1e-2, weight_decay=1e-1, schedule="cosine", warmup_steps=10),
])
def test_masked_weights_stay_exactly_zero_for_100_steps(opt):
    cfg = TrainConfig(batch_size=12, steps=100, eval_every=25, **opt)
    engine = Engine(TinyMLP(), tiny_data(), cfg)
    state, masks = population(engine, [0, 1])
    result = engine.run(state, [0, 1])
    assert int(result.state.step[0]) == 100
    for k in range(2):
        params = unstack(result.state.params, k)
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks[k])):
            p = np.asarray(p)
            assert np.all(p[~m] == 0.0)
            assert not np.any(np.signbit(p[~m]))  # +0.0, not -0.0
            assert np.all(p[m] != 0.0)  # survivors did train
        # optimizer moments of pruned weights never become non-zero, so nothing leaks back
        checked = 0
        for leaf_tree in jax.tree.leaves(result.state.opt_state, is_leaf=lambda x: isinstance(x, dict)):
            if isinstance(leaf_tree, dict) and set(leaf_tree) == set(params):
                for mom, m in zip(jax.tree.leaves(unstack(leaf_tree, k)), jax.tree.leaves(masks[k])):
                    assert np.all(np.asarray(mom)[~m] == 0.0)
                    checked += 1
        assert checked >= 4  # at least one moment tree (4 leaves) was inspected


def test_population_equals_separate_runs():
    cfg = TrainConfig(optimizer="adam", lr=1e-2, batch_size=12, steps=60, eval_every=20)
    engine = Engine(TinyMLP(), tiny_data(), cfg)
    state, _ = population(engine, [0, 1, 2])
    together = engine.run(state, [0, 1, 2])
    for k, s in enumerate([0, 1, 2]):
        single = engine.run(jax.tree.map(lambda x: x[k:k + 1], state_copy(engine, [0, 1, 2])), [s])
        for a, b in zip(jax.tree.leaves(unstack(together.state.params, k)),
                        jax.tree.leaves(unstack(single.state.params, 0))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        rows_t = [r for r in together.records if r["member"] == k]
        rows_s = single.records
        assert [r["step"] for r in rows_t] == [r["step"] for r in rows_s]
        np.testing.assert_allclose([r["loss"] for r in rows_t], [r["loss"] for r in rows_s], rtol=1e-5)


def state_copy(engine, seeds):
    return population(engine, seeds)[0]


def test_same_seed_gives_identical_metrics_twice():
    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=12, steps=40, eval_every=10)
    data = tiny_data()
    runs = []
    for _ in range(2):
        engine = Engine(TinyMLP(), data, cfg)
        state, _ = population(engine, [7])
        runs.append(engine.run(state, [7]).records)
    assert runs[0] == runs[1]
    assert len(runs[0]) == 4 * 3  # 4 evaluations x (train, val, test)


def test_segment_boundaries_do_not_change_results():
    """Snapshots split the scan into more segments; the trajectory must not change."""
    cfg = TrainConfig(optimizer="adam", lr=1e-2, batch_size=12, steps=50, eval_every=25)
    engine = Engine(TinyMLP(), tiny_data(), cfg)
    a = engine.run(population(engine, [0])[0], [0])
    b = engine.run(population(engine, [0])[0], [0], snapshot_steps=[7, 13])
    assert sorted(b.snapshots) == [7, 13]
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
        np.testing.assert_array_equal(x, y)
    # resuming from step 25 with the state at 25 gives the same end point
    c = engine.run(population(engine, [0])[0], [0], stop=25)
    d = engine.run(c.state, [0], start=25)
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(d.state.params)):
        np.testing.assert_array_equal(x, y)


def test_data_order_is_a_function_of_seed_and_step():
    order = DataOrder(100, 10)
    a = order.indices(3, 5, 25)
    assert a.shape == (20, 10)
    np.testing.assert_array_equal(a, DataOrder(100, 10).indices(3, 5, 25))
    # one epoch is a permutation of the whole split
    assert sorted(order.indices(3, 0, 10).ravel().tolist()) == list(range(100))
    assert not np.array_equal(order.indices(3, 0, 10), order.indices(4, 0, 10))


def test_schedules():
    step = make_schedule(TrainConfig(lr=0.1, schedule="step", milestones=(10, 20), gamma=0.5), 30)
    assert [float(step(s)) for s in (0, 9, 10, 19, 20)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    cos = make_schedule(TrainConfig(lr=0.1, schedule="cosine"), 100)
    assert float(cos(0)) == pytest.approx(0.1)
    assert float(cos(50)) == pytest.approx(0.05, rel=1e-4)
    assert float(cos(100)) == pytest.approx(0.0, abs=1e-7)
    warm = make_schedule(TrainConfig(lr=0.1, schedule="constant", warmup_steps=10), 100)
    assert float(warm(0)) == 0.0 and float(warm(5)) == pytest.approx(0.05) and float(warm(50)) == pytest.approx(0.1)


def test_training_learns_and_early_stop_is_min_val_loss():
    cfg = TrainConfig(optimizer="adam", lr=1e-2, batch_size=24, steps=200, eval_every=20)
    engine = Engine(TinyMLP(), tiny_data(), cfg)
    state, _ = population(engine, [0], density=1.0)
    res = engine.run(state, [0])
    test = [r for r in res.records if r["split"] == "test"]
    assert test[-1]["accuracy"] > 0.8 and test[-1]["accuracy"] > test[0]["accuracy"]
    val = [r for r in res.records if r["split"] == "val"]
    best = min(val, key=lambda r: r["loss"])
    assert early_stop_steps(res.records) == {0: best["step"]}


def test_early_stop_is_never_selected_on_test():
    rec = [{"member": 0, "step": st, "split": sp, "loss": lo, "accuracy": 0.5}
           for st, sp, lo in ((10, "test", 0.9), (20, "test", 0.1), (10, "val", 0.2), (20, "val", 0.3))]
    assert early_stop_steps(rec) == {0: 10}  # val loss minimum, although test loss is lower at 20
    assert early_stop_steps([r for r in rec if r["split"] == "test"]) == {}  # no val split: nothing chosen


def test_a_diverging_member_is_recorded_and_does_not_disturb_the_others():
    cfg = TrainConfig(optimizer="sgd", lr=1.0, batch_size=12, steps=40, eval_every=20)
    data = tiny_data()
    # member 1 gets inputs scaled so that sgd at lr 1 overflows; member 0 trains normally
    engine = Engine(TinyMLP(), data, cfg)
    state, _ = population(engine, [0, 1], density=1.0)
    state = state.replace(params=jax.tree.map(lambda p: p.at[1].multiply(1e19), state.params))
    res = engine.run(state, [0, 0])
    assert 1 in res.diverged and 0 not in res.diverged
    assert 1 <= res.diverged[1] <= 40
    assert all(np.isfinite(r["loss"]) for r in res.records if r["member"] == 0)


SHARDING_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from test_train import TinyMLP, tiny_data, population
from lth.config import TrainConfig
from lth.train import Engine
cfg = TrainConfig(optimizer="adam", lr=1e-2, batch_size=12, steps=30, eval_every=15)
engine = Engine(TinyMLP(), tiny_data(), cfg)
state, _ = population(engine, [0, 1, 2, 3])
res = engine.run(state, [0, 1, 2, 3])
shards = len(res.state.params["output"]["kernel"].sharding.device_set)
print(json.dumps({{"devices": jax.local_device_count(), "shards": shards,
                  "params": [np.asarray(x).tolist() for x in jax.tree.leaves(res.state.params)],
                  "loss": [r["loss"] for r in res.records]}}))
"""


def test_population_sharded_over_two_devices_equals_one_device():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = SHARDING_SCRIPT.format(tests=str(Path(__file__).parent))
    out = {}
    for n in (1, 2):
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        out[n] = json.loads(r.stdout.strip().splitlines()[-1])
    assert out[1]["devices"] == 1 and out[2]["devices"] == 2
    assert out[2]["shards"] == 2  # the population axis really is split over both devices
    np.testing.assert_allclose(out[1]["loss"], out[2]["loss"], rtol=1e-5)
    for a, b in zip(out[1]["params"], out[2]["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", ["DIR", "off"])
def test_importing_lth_turns_on_the_persistent_compile_cache_unless_off(setting, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["LTH_COMPILE_CACHE"] = str(tmp_path) if setting == "DIR" else setting
    code = "import jax, lth; print(jax.config.jax_compilation_cache_dir)"  # jax imported first on purpose
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (str(tmp_path) if setting == "DIR" else "None")


def test_lths_compile_cache_is_unbounded_for_jax_and_trimmed_by_lth(tmp_path):
    # jax's own bound lists and reads every entry under a lock on every write: lth bounds it itself
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["LTH_COMPILE_CACHE"] = str(tmp_path)
    code = "import lth, jax; print(jax.config.jax_compilation_cache_max_size)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "-1"
    assert (tmp_path / ".lth-trimmed").exists()  # the import trimmed (and stamped) the folder
    # a bound the caller chose is jax's to keep: lth does not trim then
    env["JAX_COMPILATION_CACHE_MAX_SIZE"] = "1000000"
    (tmp_path / ".lth-trimmed").unlink()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1000000" and not (tmp_path / ".lth-trimmed").exists()


def test_trim_compile_cache_deletes_the_least_recently_used_programs_down_to_the_bound(tmp_path):
    from lth import trim_compile_cache
    for i in range(6):  # programs 0..5, used in that order, 100 bytes each; jax's old access stamps beside
        (tmp_path / f"jit_f-{i}-cache").write_bytes(b"x" * 100)
        (tmp_path / f"jit_f-{i}-atime").write_bytes(b"t" * 8)
        os.utime(tmp_path / f"jit_f-{i}-cache", (1000 + i, 1000 + i))
    (tmp_path / "unrelated.txt").write_bytes(b"y" * 10_000)  # not a program: neither counted nor deleted
    assert trim_compile_cache(str(tmp_path), max_bytes=350, every_s=0) == 3
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".lth-trimmed", "jit_f-3-atime", "jit_f-3-cache", "jit_f-4-atime", "jit_f-4-cache",
                    "jit_f-5-atime", "jit_f-5-cache", "unrelated.txt"]
    # at most one trim per `every_s`: a second call right after does nothing, whatever the bound
    assert trim_compile_cache(str(tmp_path), max_bytes=0, every_s=600) == 0
    assert (tmp_path / "jit_f-3-cache").exists()
    assert trim_compile_cache(str(tmp_path), max_bytes=0, every_s=0) == 3
    assert trim_compile_cache(str(tmp_path / "missing"), max_bytes=0, every_s=0) == 0


@pytest.mark.parametrize("setting, expected", [("", "auto"), ("1", 1), ("3", 3)])
def test_importing_lth_exposes_one_cpu_device_per_core(setting, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "LTH_CPU_DEVICES")}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # no device count of the caller's
    env["JAX_PLATFORMS"] = "cpu"
    env["LTH_CPU_DEVICES"] = setting
    code = "import lth, jax; print(jax.local_device_count())"  # lth first: before jax reads XLA_FLAGS
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    if expected == "auto":
        expected = min(len(os.sched_getaffinity(0)), 4)
    assert int(out.stdout.strip()) == expected
    # a device count the caller chose wins
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == 2


def test_divergence_is_a_non_finite_loss_or_one_above_100x_its_first_step_value():
    from lth.train import DIVERGENCE_FACTOR, diverged_steps
    loss = np.array([[2.3, 2.0, 1e17, 1.0],    # explodes to a finite 1e17: diverged at its step 3
                     [2.3, 2.2, 2.1, 2.0],     # fine
                     [2.3, np.nan, 1.0, 1.0],  # non-finite: step 2
                     [0.01, 50.0, 99.0, 0.5]])  # starts near 0: the limit is 100 x max(first, 1) = 100
    assert DIVERGENCE_FACTOR == 100
    assert diverged_steps(loss, loss[:, 0], pos=10) == {0: 13, 2: 12}

# ---------------------------------------------------------------------------- segment strategies

class TinyConv(nn.Module):
    """Conv, strided conv, dense: lth's conv layers (gradients in the layout XLA runs fast in a loop)."""

    stock: bool = False  # plain nn.Conv: jax's gradient convolutions, slow inside a loop on CPU

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = {} if self.stock else {"conv_general_dilated": loop_friendly_conv}
        x = nn.relu(nn.Conv(4, (3, 3), name="conv_0", **kw)(x))
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), name="conv_1", **kw)(x))
        return nn.Dense(3, name="output")(x.reshape((x.shape[0], -1)))


def tiny_images(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + 60, 6, 6, 3)).astype(np.float32)
    y = (x[:, :3].mean((1, 2, 3)) > x[:, 3:].mean((1, 2, 3))).astype(np.int32) + (x[..., 0].mean((1, 2)) > 0)
    return SimpleNamespace(x_train=x[:n], y_train=y[:n], x_val=x[n:n + 30], y_val=y[n:n + 30],
                           x_test=x[n + 30:], y_test=y[n + 30:], num_classes=3, input_shape=(6, 6, 3))


def test_auto_segment_scans_unless_a_conv_is_slow_in_a_loop_on_cpu():
    cfg = TrainConfig(batch_size=8, steps=4)
    assert segment_strategy(cfg, TinyMLP(), (8,)) == "scan"
    assert segment_strategy(cfg, TinyConv(), (6, 6, 3)) == "scan"
    assert segment_strategy(cfg, TinyConv(stock=True), (6, 6, 3)) == ("step" if jax.default_backend() == "cpu" else "scan")
    assert segment_strategy(TrainConfig(segment="step"), TinyMLP(), (8,)) == "step"
    assert Engine(TinyConv(), tiny_images(), TrainConfig(batch_size=8, steps=4, segment="step")).segment == "step"


def test_a_segment_longer_than_segment_indices_runs_in_pieces_with_the_same_results(monkeypatch):
    """A long segment (QAT's one segment, a large eval_every) is cut so its batch indices stay small."""
    from lth import train as train_module
    data = tiny_data()
    cfg = TrainConfig(optimizer="adam", lr=1e-2, batch_size=12, steps=20, eval_every=20)
    e = Engine(TinyMLP(), data, cfg)
    whole = e.run(population(e, [0, 1])[0], [0, 1])
    calls = []
    segment = e._train_segment
    monkeypatch.setattr(e, "_train_segment", lambda state, idx, *a: calls.append(idx.shape) or segment(state, idx, *a))
    monkeypatch.setattr(train_module, "SEGMENT_INDICES", 7 * 12 * 2)  # 7 steps of 2 members
    pieces = e.run(population(e, [0, 1])[0], [0, 1])
    assert [c[1] for c in calls] == [7, 7, 6]  # [K, S, B]: 20 steps in pieces of 7
    assert pieces.records == whole.records or np.allclose([r["loss"] for r in pieces.records],
                                                          [r["loss"] for r in whole.records], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(whole.state.params), jax.tree.leaves(pieces.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_scan_and_step_agree_to_float_rounding_on_the_mlp_and_the_docs_say_so():
    """XLA may fuse a step differently inside a loop body than at the top level: on an MLP the two
    strategies differ in the last bits (~1e-9), so the docs promise float rounding, not the same bits."""
    from lth import train as train_module
    data = tiny_data()
    common = dict(optimizer="adam", lr=1e-2, batch_size=12, steps=20, eval_every=10)
    runs = {}
    for seg in ("scan", "step"):
        e = Engine(TinyMLP(), data, TrainConfig(segment=seg, **common))
        runs[seg] = e.run(population(e, [0, 1])[0], [0, 1])
    for a, b in zip(jax.tree.leaves(runs["scan"].state.params), jax.tree.leaves(runs["step"].state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([r["loss"] for r in runs["scan"].records], [r["loss"] for r in runs["step"].records],
                               rtol=1e-5)
    doc = next(f for f in dataclasses.fields(TrainConfig) if f.name == "segment").metadata["doc"]
    for text in (doc, train_module.__doc__, train_module.segment_strategy.__doc__):
        assert "float rounding" in text and "bitwise-identical" not in text


def test_scan_and_step_segments_are_bitwise_identical_with_a_resume_between():
    """Two members with their own data orders, masks, several segments (evals every 5 steps, a
    snapshot at 7, eval chunks with padding), then the same run stopped at 10 and resumed by the
    other strategy: weights, optimizer moments and every metric agree to the bit; pruned weights
    are +0.0 throughout."""
    data = tiny_images()
    common = dict(optimizer="adam", lr=1e-2, batch_size=8, steps=15, eval_every=5, eval_batch_size=16)
    engines = {seg: Engine(TinyConv(), data, TrainConfig(segment=seg, **common)) for seg in ("scan", "step")}
    assert {e.segment for e in engines.values()} == {"scan", "step"}
    runs = {seg: e.run(population(e, [0, 1])[0], [0, 1], snapshot_steps=[7]) for seg, e in engines.items()}
    first = engines["step"].run(population(engines["step"], [0, 1])[0], [0, 1], stop=10)
    resumed = engines["scan"].run(first.state, [0, 1], start=10)
    runs["step then scan"] = SimpleNamespace(state=resumed.state, records=first.records + resumed.records,
                                             snapshots=runs["scan"].snapshots)
    ref = runs["scan"]
    assert len(ref.records) == 3 * 3 * 2  # 3 evaluations x (train, val, test) x 2 members
    _, masks = population(engines["scan"], [0, 1])
    for name, run in runs.items():
        assert run.records == ref.records, name
        for a, b in zip(jax.tree.leaves((ref.state.params, ref.state.opt_state, ref.snapshots)),
                        jax.tree.leaves((run.state.params, run.state.opt_state, run.snapshots))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        for k in range(2):
            for p, m in zip(jax.tree.leaves(unstack(run.state.params, k)), jax.tree.leaves(masks[k])):
                p = np.asarray(p)
                assert np.all(p[~m] == 0.0) and not np.any(np.signbit(p[~m])) and np.all(p[m] != 0.0)
    assert int(runs["step then scan"].state.step[0]) == 15


def test_step_segments_population_equals_separate_runs():
    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=8, steps=6, eval_every=3, segment="step")
    engine = Engine(TinyConv(), tiny_images(), cfg)
    together = engine.run(population(engine, [0, 1])[0], [0, 1])
    for k in range(2):
        single = engine.run(jax.tree.map(lambda x: x[k:k + 1], population(engine, [0, 1])[0]), [k])
        for a, b in zip(jax.tree.leaves(unstack(together.state.params, k)), jax.tree.leaves(unstack(single.state.params, 0))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([r["loss"] for r in together.records if r["member"] == k],
                                   [r["loss"] for r in single.records], rtol=1e-5)


def test_observed_steps_change_no_numbers():
    """``Engine.run(observe=...)`` splits segments at the observed steps (early-bird snapshots) and
    hands over host copies; the trained weights and records are bitwise those of a run without it."""
    cfg = TrainConfig(batch_size=12, steps=40, eval_every=20, optimizer="adam", lr=1e-2)
    engine = Engine(TinyMLP(), tiny_data(), cfg)
    plain = engine.run(population(engine, [0, 1])[0], [0, 1])
    seen = []
    watched = engine.run(population(engine, [0, 1])[0], [0, 1], observe_steps=[0, 7, 20, 33, 40],
                         observe=lambda step, w: seen.append((step, w["params"]["output"]["kernel"].shape)))
    assert seen == [(s, (2, 16, 3)) for s in (0, 7, 20, 33, 40)]
    for a, b in zip(jax.tree.leaves(plain.state.params), jax.tree.leaves(watched.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert plain.records == watched.records



def test_engines_of_equal_settings_share_their_programs_and_others_do_not():
    import optax
    from lth.train import make_schedule
    cfg = TrainConfig(batch_size=12, steps=20, eval_every=10, optimizer="adam", lr=1e-2)
    data, other_data = tiny_data(seed=0), tiny_data(seed=1)  # same shapes, other values
    a, b = Engine(TinyMLP(), data, cfg), Engine(TinyMLP(), other_data, cfg)
    assert a._segment is b._segment and a._eval is b._eval  # equal model and settings: traced once
    half = Engine(TinyMLP(), data, dataclasses.replace(cfg, lr=5e-3))
    assert half._segment is not a._segment and half._eval is a._eval  # evaluation does not use the lr
    const = optax.constant_schedule(1e-3)
    assert Engine(TinyMLP(), data, cfg, lr_fn=const)._segment is not a._segment
    # an lr_fn is shared only when the caller says what it computes
    c1 = Engine(TinyMLP(), data, cfg, lr_fn=const, lr_key=("constant", 1e-3))
    c2 = Engine(TinyMLP(), data, cfg, lr_fn=optax.constant_schedule(1e-3), lr_key=("constant", 1e-3))
    assert c1._segment is c2._segment and c1._segment is not a._segment
    assert Engine(TinyMLP(), data, cfg, lr_fn=const)._segment is not c1._segment
    # the data are arguments, not captured: b (a's programs) trains on its own data exactly as an
    # engine with programs of its own (the same schedule passed as an lr_fn without a key)
    own = Engine(TinyMLP(), other_data, cfg, lr_fn=make_schedule(cfg, b.num_steps))
    assert own._segment is not b._segment
    results = []
    for eng in (b, own):
        state, _ = population(eng, [0, 1])
        results.append(eng.run(state, [0, 1]))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(results[0].state.params),
                                                   jax.tree.leaves(results[1].state.params)))
    state, _ = population(a, [0, 1])
    trained_on_a = a.run(state, [0, 1])
    assert not np.array_equal(jax.tree.leaves(trained_on_a.state.params)[0], jax.tree.leaves(results[0].state.params)[0])


def test_engines_traced_under_other_conv_pieces_do_not_share(monkeypatch):
    # $LTH_CPU_CONV_CHUNK_PIXELS is read when a conv program is traced: a program traced under another
    # value is another program
    cfg = TrainConfig(batch_size=12, steps=20, eval_every=10, optimizer="adam", lr=1e-2)
    monkeypatch.setenv("LTH_CPU_CONV_CHUNK_PIXELS", "0")
    whole = Engine(TinyMLP(), tiny_data(), cfg)
    monkeypatch.setenv("LTH_CPU_CONV_CHUNK_PIXELS", "64")
    pieces = Engine(TinyMLP(), tiny_data(), cfg)
    assert pieces._segment is not whole._segment and pieces._eval is not whole._eval
    assert Engine(TinyMLP(), tiny_data(), cfg)._segment is pieces._segment
