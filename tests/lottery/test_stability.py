"""Linear-mode-connectivity instability: copies as members, the path evaluation, the stored stage."""

import json

import jax
import numpy as np
import pandas as pd
import pytest

from analysis import instability_table, load_runs, load_stability
from lth.cli import main
from lth.config import ConfigError
from lth.data import load_dataset
from lth.lottery.runner import Member, data_seed, member_rngs, read_members
from lth.lottery.stability import (STABILITY_DIR, PathEvaluator, StabilityStage, interpolate, path_rows,
                                   rewind_stability)
from lth.models import build_model
from lth.pipeline import run_experiment, run_status
from lth.stored import StoredRun
from lth.train import Engine, init_population
from lth.trees import seed_keys

from helpers import random_params, tiny

LEVELS = {"levels": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run (2 seeds, 4 arms, 1 level) with and without stability copies."""
    root = tmp_path_factory.mktemp("stab")
    on = tiny(prune=LEVELS, stability={"enabled": True, "points": 7})
    off = tiny(prune=LEVELS)
    assert on.run_id == off.run_id  # [stability] is not part of the run id
    store_on = run_experiment(on, root / "on", progress=False)
    store_off = run_experiment(off, root / "off", progress=False)
    return on, store_on, store_off


def _pair_setup(cfg, steps=30):
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.num_classes, data.input_shape)
    engine = Engine(model, data, cfg.train)
    params, bs = init_population(model, seed_keys([0]), data.input_shape)
    return data, model, engine, params, bs


def _train_pair(engine, params, bs, members, stop):
    """Two members that start from the same weights (params [1, ...]) with the members' data seeds and rngs."""
    two = jax.tree.map(lambda a: np.concatenate([np.asarray(a)] * 2), (params, bs))
    mask = jax.tree.map(lambda a: np.ones(a.shape, bool), two[0])
    state = engine.init(two[0], two[1], mask, member_rngs(members, 0))
    return engine.run(state, [data_seed(m) for m in members], stop=stop, evaluate=False).state


def test_the_path_between_a_network_and_itself_has_zero_barrier():
    cfg = tiny()
    data, model, _, params, bs = _pair_setup(cfg)
    ev = PathEvaluator(model, data, cfg, points=9, bn_batches=2)
    mask = jax.tree.map(lambda a: np.ones(a.shape, bool), params)
    loss, err = ev(params, params, bs, bs, mask)
    inst, barrier = path_rows(loss, err, ev.alphas)
    assert np.all(err == err[:, :1]) and inst[0] == 0.0
    assert abs(barrier[0]) < 1e-5


def test_two_copies_with_the_same_data_seed_give_zero_instability():
    cfg = tiny()
    data, model, engine, params, bs = _pair_setup(cfg)
    ev = PathEvaluator(model, data, cfg, points=7, bn_batches=2)
    same = _train_pair(engine, params, bs, [Member("ticket", 0), Member("ticket", 0)], 40)
    a, b = (jax.tree.map(lambda x: np.asarray(x)[[k]], same.params) for k in (0, 1))
    mask = jax.tree.map(lambda x: np.ones(x.shape, bool), a)
    loss, err = ev(a, b, {}, {}, mask)
    assert path_rows(loss, err, ev.alphas)[0][0] == 0.0
    # a real copy (copy 1: another batch order) ends elsewhere, so the zero above is not vacuous
    diff = _train_pair(engine, params, bs, [Member("ticket", 0), Member("ticket", 0, 1)], 40)
    assert not np.array_equal(np.asarray(diff.params["output"]["kernel"][0]),
                              np.asarray(diff.params["output"]["kernel"][1]))


def test_logistic_regression_has_no_loss_barrier():
    """Softmax cross-entropy of a linear model is convex in its weights: no point of the path is above
    the straight line between the endpoint losses (up to float error)."""
    cfg = tiny(model={"widths": []}, train={"steps": 60, "lr": 0.05})
    data, model, engine, params, bs = _pair_setup(cfg)
    pair = _train_pair(engine, params, bs, [Member("ticket", 0), Member("ticket", 0, 1)], 60)
    a, b = (jax.tree.map(lambda x: np.asarray(x)[[k]], pair.params) for k in (0, 1))
    ev = PathEvaluator(model, data, cfg, points=21, bn_batches=2)
    loss, err = ev(a, b, {}, {}, jax.tree.map(lambda x: np.ones(x.shape, bool), a))
    _, barrier = path_rows(loss, err, ev.alphas)
    assert loss[0, 0] != loss[0, -1]  # two different endpoints
    assert barrier[0] <= 1e-5


def test_interpolated_points_keep_the_mask():
    cfg = tiny()
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.num_classes, data.input_shape)
    rng = np.random.default_rng(0)
    a = random_params(model, data.input_shape, seed=1)
    mask = jax.tree.map(lambda p: rng.random(p.shape) < 0.4, a)
    a = jax.tree.map(lambda p, m: np.where(m, p, 0.0).astype(np.float32), a, mask)
    b = jax.tree.map(lambda p, m: np.where(m, p + 1.0, 0.0).astype(np.float32), a, mask)
    for alpha in np.linspace(0, 1, 11, dtype=np.float32):
        for p, m in zip(jax.tree.leaves(interpolate(a, b, alpha)), jax.tree.leaves(mask)):
            assert np.all(np.asarray(p)[~m] == 0.0)
    one = lambda t: jax.tree.map(lambda x: np.asarray(x)[None], t)  # noqa: E731
    ev = PathEvaluator(model, data, cfg, points=5, bn_batches=2)
    ev(one(a), one(b), {}, {}, one(mask))  # the program's own check passes
    leak = jax.tree.map(lambda p: np.asarray(p) + 1e-3, b)  # pruned weights not 0 at alpha = 1
    with pytest.raises(AssertionError, match="broke the mask"):
        ev(one(a), one(leak), {}, {}, one(mask))


def test_copies_are_members_keyed_by_value(runs):
    cfg, store, _ = runs
    for level in (0, 1):
        members = read_members(store.level_dir(level))
        base = [m for m in members if m.copy == 0]
        assert {m for m in members if m.copy} == {Member(m.arm, m.seed, 1) for m in base}
        raw = json.loads((store.level_dir(level) / "members.json").read_text())
        assert all(("copy" in d) == (Member.from_json(d).copy > 0) for d in raw)  # written only when nonzero
    assert Member.from_json({"arm": "ticket", "seed": 3}) == Member("ticket", 3)  # old stores stay readable
    assert data_seed(Member("ticket", 3)) == 3 and data_seed(Member("ticket", 3, 1)) >= 2**32
    # a copy starts from copy 0's weights and mask: equal masks in the store
    from lth.store import load_tree
    members = read_members(store.level_dir(1))
    masks = load_tree(store.level_dir(1) / "masks.msgpack")
    for m in members:
        if m.copy:
            i, j = members.index(Member(m.arm, m.seed)), members.index(m)
            for leaf in jax.tree.leaves(masks):
                assert np.array_equal(leaf[i], leaf[j])


def test_stability_leaves_the_accuracy_rows_unchanged(runs):
    _, store_on, store_off = runs
    keys = ["level", "arm", "seed", "step", "split"]
    a = load_runs(store_on.path).sort_values(keys, ignore_index=True)
    b = load_runs(store_off.path).sort_values(keys, ignore_index=True)
    assert len(a) == len(b) and (a[keys] == b[keys]).all().all()
    np.testing.assert_allclose(a[["loss", "accuracy", "density"]], b[["loss", "accuracy", "density"]],
                               rtol=0, atol=1e-6)
    # the sparsity table and the quant stage's population hold each (arm, seed) once
    run = StoredRun.open(store_on.path)
    pop = run.population(1)
    assert len(pop.members) == len(set(pop.members)) == 8
    sp = pd.read_parquet(store_on.level_dir(1) / "sparsity.parquet")
    assert not sp.duplicated(["arm", "seed", "layer"]).any()


def test_path_endpoints_are_the_trained_copies(runs):
    cfg, store, _ = runs
    st = load_stability(store.path)
    assert set(st["level"]) == {0, 1} and set(st["points"]) == {7}
    assert set(st[st["level"] == 1]["arm"]) == set(cfg.arms)
    m = pd.read_parquet(store.level_dir(1) / "metrics.parquet")
    final = m[(m["split"] == "test") & (m["step"] == m["step"].max())]
    t = instability_table(st)
    for r in t[t["level"] == 1].itertuples():
        acc0 = final[(final["arm"] == r.arm) & (final["seed"] == r.seed) & (final["copy"] == 0)]["accuracy"]
        acc1 = final[(final["arm"] == r.arm) & (final["seed"] == r.seed) & (final["copy"] == 1)]["accuracy"]
        assert r.error_0 == pytest.approx(1 - float(acc0.iloc[0]), abs=1e-6)
        assert r.error_1 == pytest.approx(1 - float(acc1.iloc[0]), abs=1e-6)
        assert r.instability == pytest.approx(r.max_error - (r.error_0 + r.error_1) / 2, abs=1e-9)
        assert r.instability >= 0


def test_the_stage_result_is_reused_and_recomputed_when_damaged(runs, monkeypatch):
    cfg, store, _ = runs
    folder = store.level_dir(1) / STABILITY_DIR
    (table,) = folder.glob("*.parquet")
    before = pd.read_parquet(table)
    assert run_status(cfg, store.root)["stability"] == 0
    run = StoredRun.open(store.path)

    def boom(*a, **k):
        raise AssertionError("recomputed an intact result")

    monkeypatch.setattr(PathEvaluator, "__call__", boom)
    pd.testing.assert_frame_equal(StabilityStage(run, cfg.stability).run_level(1), before)  # read back
    monkeypatch.undo()
    table.write_bytes(table.read_bytes()[:-20])  # damaged: the marker's checksum no longer matches
    assert run_status(cfg, store.root)["stability"] == 1
    assert load_stability(store.path)["level"].eq(1).sum() == 0  # a damaged result is not read
    run_experiment(cfg, store.root, progress=False)  # the pipeline recomputes exactly it
    after = pd.read_parquet(table)
    pd.testing.assert_frame_equal(after.drop(columns="wall_s"), before.drop(columns="wall_s"))


def test_rewind_step_zero_repeats_the_stage(runs, tmp_path):
    """At k = 0 (the run's rewind point) the rebuilt copies are the level's own: the same path."""
    cfg, store, _ = runs
    rows = rewind_stability(store.path, 1, [0, 20], points=7, arms=["ticket"])
    stage = load_stability(store.path, rewind=False)
    stage = stage[(stage["level"] == 1) & (stage["arm"] == "ticket")]
    k0 = rows[rows["rewind_step"] == 0]
    np.testing.assert_allclose(k0["test_error"].to_numpy(), stage["test_error"].to_numpy(), atol=1e-6)
    assert set(rows["rewind_step"]) == {0, 20}
    again = rewind_stability(store.path, 1, [20], points=7, arms=["ticket"])  # stored: read back
    pd.testing.assert_frame_equal(again, rows[rows["rewind_step"] == 20].reset_index(drop=True))
    assert main(["report", str(store.path), "--out", str(tmp_path / "fig")]) == 0
    for stem in ("error_along_path", "instability_vs_density", "instability_vs_rewind"):
        assert (tmp_path / "fig" / f"{stem}.png").is_file()


def test_bad_stability_settings_are_one_line_errors(runs, capsys):
    with pytest.raises(ConfigError, match="stability.arms"):
        tiny(arms=["ticket"], stability={"enabled": True, "arms": ["reinit"]})
    with pytest.raises(ConfigError, match="shared_data_order"):
        tiny(train={"shared_data_order": True}, stability={"enabled": True})
    with pytest.raises(ConfigError, match="stability.points"):
        tiny(stability={"points": 1})
    _, store, _ = runs
    assert main(["stability", str(store.path), "--level", "1", "--rewind-steps", "0,999999"]) == 2
    assert "--rewind-steps" in capsys.readouterr().err


def test_member_rngs_leave_copy_zero_unchanged():
    members = [Member("ticket", 5), Member("ticket", 5, 1)]
    keys = member_rngs(members, 2)
    plain = seed_keys([5], fold=2)
    assert np.array_equal(jax.random.key_data(keys[0]), jax.random.key_data(plain[0]))
    assert not np.array_equal(jax.random.key_data(keys[1]), jax.random.key_data(keys[0]))


def test_batch_norm_statistics_are_the_mean_batch_statistics():
    """Each point's running statistics: the mean over bn batches of each batch's mean and variance,
    whatever the layer's momentum."""
    import flax.linen as nn
    from lth.lottery.stability import batch_norm_stats

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.BatchNorm(use_running_average=not train, momentum=0.7)(nn.Dense(3)(x))

    net = Net()
    v = net.init(jax.random.key(0), np.zeros((1, 4), np.float32))
    bn_x = np.random.default_rng(0).normal(size=(3, 16, 4)).astype(np.float32)
    got = batch_norm_stats(net, v["params"], v["batch_stats"], bn_x)
    h = np.einsum("bni,io->bno", bn_x, np.asarray(v["params"]["Dense_0"]["kernel"])) + np.asarray(
        v["params"]["Dense_0"]["bias"])
    np.testing.assert_allclose(got["BatchNorm_0"]["mean"], h.mean(1).mean(0), atol=1e-5)
    np.testing.assert_allclose(got["BatchNorm_0"]["var"], h.var(1).mean(0), atol=1e-5)


def test_turning_stability_on_for_a_stored_run_trains_only_the_copies(runs, tmp_path):
    """Copies are members keyed by value: a run stored without them grows by them (the stored members'
    arrays kept bit for bit) and gets the same paths as a run that had them from the start."""
    import shutil
    from lth.store import load_tree
    cfg, store_on, store_off = runs
    root = tmp_path / "grown"
    shutil.copytree(store_off.root, root)
    before = {lv: (read_members(store_off.level_dir(lv)), load_tree(store_off.level_dir(lv) / "final.msgpack"))
              for lv in (0, 1)}
    grown = run_experiment(cfg, root, progress=False)
    for lv, (members, final) in before.items():
        now = read_members(grown.level_dir(lv))
        assert now[:len(members)] == members and any(m.copy for m in now[len(members):])
        kept = jax.tree.map(lambda a: np.asarray(a)[:len(members)], load_tree(grown.level_dir(lv) / "final.msgpack"))
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(kept), jax.tree.leaves(final)))
    keys = ["source", "level", "arm", "seed", "alpha"]
    got = load_stability(root)
    both = got.merge(load_stability(store_on.root), on=keys, suffixes=("", "_on"))  # store_on may hold more
    assert len(got) == 2 * 4 * 7 + 2 * 1 * 7 and len(both) == len(got)  # level 1: 4 arms, level 0: dense
    np.testing.assert_allclose(both["test_error"], both["test_error_on"], atol=1e-6)


def test_the_rebuilt_dense_run_is_the_stored_rewind_point(tmp_path):
    """lth stability rebuilds the dense run from init.msgpack: at k = rewind.step it gives the same path
    as starting from the stored rewind.msgpack."""
    import shutil
    cfg = tiny(seeds=[0], arms=["ticket"], prune=LEVELS, rewind={"step": 10})
    store = run_experiment(cfg, tmp_path, progress=False)
    from_stored = rewind_stability(store.path, 1, [10], points=5)  # k = rewind.step: rewind.msgpack
    shutil.rmtree(store.path / "stability_rewind")
    rebuilt = rewind_stability(store.path, 1, [10, 20], points=5)  # trains the dense run to step 20
    got = rebuilt[rebuilt["rewind_step"] == 10].reset_index(drop=True)
    np.testing.assert_allclose(got["test_loss"], from_stored["test_loss"], rtol=0, atol=1e-6)
    assert (got["test_error"] == from_stored["test_error"]).all()


def test_wandb_hears_of_each_member_once(tmp_path):
    from lth.lottery import Lottery

    class Sink:
        rows: list = []

        def log_level(self, level, steps, rows, sparsity=None):
            self.rows += rows

    cfg = tiny(prune={"levels": 0}, train={"steps": 20}, stability={"enabled": True})
    lot = Lottery(cfg, tmp_path, progress=False)
    sink = Sink()
    lot.run(sink)
    assert len(read_members(lot.store.level_dir(0))) == 4  # 2 seeds x 2 copies trained
    rows = pd.DataFrame(sink.rows)
    assert set(rows["copy"]) == {0} and not rows.duplicated(["arm", "seed", "step", "split"]).any()
